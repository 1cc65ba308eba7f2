"""`qoptim memory`'s counting (qoptim.cli.memory): parameter tensors from a Hugging Face config, the
optimizer state they need, and a config's mistakes as clear errors."""

import json
import re

import pytest

from qoptim.cli.memory import QMAP_BYTES, estimate, report, tensor_sizes


def test_memory_of_a_hugging_face_config(tmp_path):
    config = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
    }  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    _, sizes = tensor_sizes(str(path))
    assert sum(sizes) == 6_738_415_616  # Llama-2-7B's published parameter count
    assert min(sizes) == 4096  # even the norms reach min_8bit_size
    assert estimate(sizes)[1].state_bytes == sum(2 * s + 8 * -(-s // 256) for s in sizes) + 2 * QMAP_BYTES
    text = report(str(path))
    assert "6,738,415,616 parameters" in text and "80 GB (H100)" in text


def test_tensors_below_min_8bit_size_count_as_fp32_state(tmp_path):
    config = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 16, "vocab_size": 1000}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    _, sizes = tensor_sizes(str(path))
    small = [s for s in sizes if s < 4096]
    assert small == [1024] * 5  # two norms per layer and the final one; embeddings tied by default
    big = [s for s in sizes if s >= 4096]
    assert estimate(sizes)[1].state_bytes == 8 * sum(small) + sum(2 * s + 8 * -(-s // 256) for s in big) + 2 * QMAP_BYTES


def test_gpt2_config_counts_like_gpt2_small(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert sum(tensor_sizes(str(path))[1]) == 124_439_808  # GPT-2 small, tied embeddings


@pytest.mark.parametrize(
    "content,message",
    [
        ("[1, 2, 3]", "must hold a JSON object"),
        ('{"hidden_size": "4096", "num_hidden_layers": 2, "vocab_size": 10}', "hidden_size must be a positive integer"),
        ('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10, "num_attention_heads": 0}', "num_attention_heads must be"),
        ('{"hidden_size": 64, "num_hidden_layers": 2}', "none of ('vocab_size',)"),
    ],
)
def test_a_malformed_model_config_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        tensor_sizes(str(path))


def test_an_overflowing_parameter_count_is_a_clear_error():
    with pytest.raises(ValueError, match="too large"):
        tensor_sizes("1e400")

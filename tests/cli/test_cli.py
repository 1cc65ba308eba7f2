"""The `qoptim` command: demo, memory and the errors a user can make."""

import json
import re
import subprocess
import sys

import pytest

from qoptim.memory import estimate, report, tensor_sizes


def qoptim(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qoptim", *args], capture_output=True, text=True, timeout=timeout)


def _table(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_demo_prints_a_consistent_table_and_draws_the_plot(tmp_path):
    result = qoptim("demo", "--steps", "25", "--out", str(tmp_path), "--optimizers", "torch_adamw,adamw8bit,pagedadamw8bit")
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert set(rows) == {"torch_adamw", "adamw8bit", "pagedadamw8bit"}
    mib = {name: float(cells[0]) for name, cells in rows.items()}  # "0.87 MiB" -> cells[0] == "0.87"
    assert float(rows["torch_adamw"][2]) == pytest.approx(8.0)  # bytes per parameter
    for name in ("adamw8bit", "pagedadamw8bit"):
        assert 0.24 < mib[name] / mib["torch_adamw"] < 0.30  # ~2.03-2.1 of 8 bytes per parameter
    for cells in rows.values():
        train_loss, val_loss = float(cells[-2]), float(cells[-1])
        assert train_loss < 4.0 and val_loss < 4.0  # from ~4.9 (uniform over 128 characters)
    png = tmp_path / "loss_curves.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--optimizers", "sgd9000"], "unknown optimizer sgd9000"),
        (["demo", "--device", "tpu"], "unknown device 'tpu'"),
        (["demo", "--device", "cuda:0"], "CUDA is not available"),
        (["demo", "--steps", "0"], "expected a positive integer, got 0"),
        (["memory", "does-not-exist.json"], "cannot read the model config"),
        (["memory", "seven billion"], "MODEL_SPEC must be"),
    ],
)
def test_user_errors_give_one_clear_line(args, message):
    if "cuda:0" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    result = qoptim(*args, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_memory_of_a_parameter_count():
    result = qoptim("memory", "7B", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "7B: 7,000,000,000 parameters" in result.stdout
    assert "52.15 GiB" in result.stdout  # fp32 Adam: 8 bytes x 7e9
    fp32, eight, paged = estimate([7_000_000_000])
    assert eight.state_bytes == 2 * 7_000_000_000 + 8 * -(-7_000_000_000 // 256)
    # paged: only the block scales must stay on the GPU
    assert paged.state_bytes == eight.state_bytes and paged.resident_bytes == 8 * -(-7_000_000_000 // 256)


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
    assert estimate(sizes)[1].state_bytes == sum(2 * s + 8 * -(-s // 256) for s in sizes)
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
    assert estimate(sizes)[1].state_bytes == 8 * sum(small) + sum(2 * s + 8 * -(-s // 256) for s in big)


def test_gpt2_config_counts_like_gpt2_small(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert sum(tensor_sizes(str(path))[1]) == 124_439_808  # GPT-2 small, tied embeddings


def test_a_training_process_that_dies_is_reported_not_waited_on():
    import multiprocessing as mp
    import os

    from qoptim.demo import _wait_for_result

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=os._exit, args=(3,))  # dies without putting a result
    child.start()
    status, message = _wait_for_result(child, queue)
    child.join()
    assert status == "error" and "exited with code 3" in message


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

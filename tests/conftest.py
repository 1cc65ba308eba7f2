import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_override_manager():
    """GlobalOptimManager is a process-wide singleton: give every test an empty one."""
    from qoptim.optim import GlobalOptimManager

    yield
    GlobalOptimManager.get_instance().initialize()

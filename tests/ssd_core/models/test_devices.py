import pytest
import torch

from ssd_core.models.devices import resolve_device


def test_auto_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_explicit_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_names_the_source(setting):
    with pytest.raises(ValueError, match=rf"SSD_DEVICE={setting}: CUDA is not available"):
        resolve_device(setting, "SSD_DEVICE")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def randomize_norms_and_bias(model: torch.nn.Module, seed: int = 1) -> None:
    """Move norm weights away from 1 and give the V3 router bias non-zero values, so that a
    mistake in either cannot hide behind the default initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=gen))

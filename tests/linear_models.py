"""Linear two-class models, whose smoothed probabilities and distances to the decision
boundary are known in closed form: the analytic cases of the certificate tests."""
import torch


class Linear(torch.nn.Module):
    """Scores (-z, z) with z = w·x + b: class 1 iff w·x + b >= 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone().float(), requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


def inputs_at_margins(w: torch.Tensor, b: float, margins) -> torch.Tensor:
    """Inputs x with w·x + b = margins[i], around 0.5 in every coordinate."""
    base = torch.full((len(w),), 0.5)
    shift = (torch.as_tensor(margins).float() - (base @ w + b)) / (w @ w)
    return base + shift[:, None] * w

"""Batched prediction: logits in eval mode and in batches, accuracy."""
import pytest
import torch
from torch import nn

from ensemble_kd.inference import evaluate, predict_logits, predict_probs


class Lookup(nn.Module):
    """Logits read from a table: row i of the input selects TABLE[int(x[i, 0])]."""

    TABLE = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])  # argmax 0, 1, 2

    def forward(self, x):
        return self.TABLE[x[:, 0].long()]


def test_evaluate_by_hand():
    x = torch.tensor([[0.0], [1.0], [1.0], [1.0], [0.0]])  # predictions 0, 1, 1, 1, 0
    y = torch.tensor([0, 0, 1, 1, 1])
    result = evaluate(Lookup(), x, y, batch_size=2)
    assert result.accuracy == pytest.approx(3 / 5)  # rows 0, 2, 3 are right
    assert torch.equal(result.logits, Lookup.TABLE[[0, 1, 1, 1, 0]])


def test_prediction_runs_in_eval_mode_and_restores_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9)).train()
    x = torch.randn(7, 4)
    logits = predict_logits(model, x, batch_size=3)  # dropout off: the same as one eval batch
    assert model.training
    with torch.no_grad():
        assert torch.allclose(logits, model.eval()(x))
    assert torch.allclose(predict_probs(model, x, batch_size=2), torch.softmax(logits, 1))
    assert predict_logits(model, x[:0]).numel() == 0

"""The learned representation: a small convolutional network trained on the training films,
exported to ONNX and run at serving time by OpenCV (`features.Trunk`), so the webapp, its image
and a logged model need no PyTorch. Training needs it: the `train` extra.

The network sees what `features.trunk_input` gives it (the rank-normalised canvas at
TRUNK_SIDE pixels) and learns NORMAL against PNEUMONIA from the films and their augmented copies
(`hm_mlflow.augment`: other framings, exposures and processing), jittered again at every epoch
by a random crop, a small rotation and a left-right flip. Its head is dropped: the embedding
(the global average of the last convolution) is what the scikit-learn head of the model reads,
beside the hand-made descriptors. Fixed seeds, one thread pool: the same films give the same
network on the same machine.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import time
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from hm_mlflow.features import TRUNK_SIDE

WIDTH = 12
"""Channels of the first convolution; each of the four that follow doubles it, to 8 x WIDTH."""
EPOCHS = 8
BATCH = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-3
DROPOUT = 0.3
JITTER_SCALE = (0.8, 1.0)
JITTER_DEGREES = 8.0


class Network(nn.Module):
    """Five 3 x 3 convolutions with batch normalisation and ReLU, max-pooled between them,
    global average pooling (the embedding, 8 x WIDTH values), dropout and a logistic unit."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        channels = [1, width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers: list[nn.Module] = []
        for index, (inputs, outputs) in enumerate(itertools.pairwise(channels)):
            if index:
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
                nn.BatchNorm2d(outputs),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], 1)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.trunk(x))).squeeze(1)


@dataclass
class TrainedTrunk:
    """A trained trunk as the model carries it, and what the training run logs of it."""

    onnx: bytes
    width: int  # values in the embedding
    parameters: int
    epochs: int
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    seconds: float = 0.0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx).hexdigest()


def _jitter(inputs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop (80-100 % of the side), rotation and left-right flip of each input."""
    side = TRUNK_SIDE
    out = np.empty((len(inputs), side, side), np.float32)
    for i, image in enumerate(inputs.astype(np.float32)):
        crop = int(side * rng.uniform(*JITTER_SCALE))
        top, left = rng.integers(0, side - crop + 1, 2)
        matrix = cv2.getRotationMatrix2D(
            (left + crop / 2, top + crop / 2), rng.uniform(-JITTER_DEGREES, JITTER_DEGREES), 1.0
        )
        matrix[:, 2] -= (left, top)
        matrix[:, :2] *= side / crop
        matrix[:, 2] *= side / crop
        image = cv2.warpAffine(image, matrix, (side, side), borderMode=cv2.BORDER_REFLECT)
        out[i] = image[:, ::-1] if rng.random() < 0.5 else image
    return out


def fit(
    views: np.ndarray,
    y: np.ndarray,
    index: np.ndarray | None = None,
    epochs: int = EPOCHS,
    seed: int = 0,
    progress: bool = True,
    desc: str = "trunk",
) -> tuple[Network, TrainedTrunk]:
    """Train the network on films `index` (all by default) of `views` (copies, n, side, side):
    trunk inputs of each film as served (copy 0) and of its augmented copies. Each epoch
    takes every film once, as one of its copies drawn at random and jittered; the classes are
    weighted to count equally."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    index = np.arange(views.shape[1]) if index is None else np.asarray(index)
    labels = y[index].astype(np.float32)
    positive = float(labels.mean())
    pos_weight = torch.tensor((1 - positive) / max(positive, 1e-6))
    network = Network()
    optimiser = torch.optim.AdamW(network.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * -(-len(index) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, LEARNING_RATE, total_steps=steps)
    losses, started = [], time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for _ in bar:
        network.train()
        order = rng.permutation(len(index))
        copies = rng.integers(0, len(views), len(index))
        total = 0.0
        for start in range(0, len(order), BATCH):
            batch = order[start : start + BATCH]
            inputs = _jitter(views[copies[batch], index[batch]], rng)
            logits = network(torch.from_numpy(inputs[:, None]))
            loss = F.binary_cross_entropy_with_logits(
                logits, torch.from_numpy(labels[batch]), pos_weight=pos_weight
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(order))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    network.eval()
    trained = TrainedTrunk(
        onnx=export(network),
        width=network.head.in_features,
        parameters=sum(p.numel() for p in network.trunk.parameters()),
        epochs=epochs,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
    return network, trained


def export(network: Network) -> bytes:
    """The trunk (the network without dropout and head) as an ONNX graph OpenCV reads, any
    batch size."""
    trunk = network.trunk.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is the one OpenCV's reader follows
        warnings.simplefilter("ignore")
        torch.onnx.export(
            trunk,
            torch.zeros(1, 1, TRUNK_SIDE, TRUNK_SIDE),
            buffer,
            input_names=["canvas"],
            output_names=["embedding"],
            dynamic_axes={"canvas": {0: "films"}, "embedding": {0: "films"}},
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


def embed(network: Network, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """Embeddings (n, width) of trunk inputs (n, side, side) by the PyTorch network: what the
    exported graph computes (`features.Trunk`), batched for training's many films."""
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch):
            chunk = np.asarray(inputs[start : start + batch], dtype=np.float32)
            out.append(network.trunk(torch.from_numpy(chunk[:, None])).numpy())
    return np.concatenate(out) if out else np.zeros((0, network.head.in_features), np.float32)

"""One typed description of a trained model: what models/<kind>/model.json holds beside the weights.

kind (a key of models/kinds.py), arch (the params that rebuild it), num_classes (classes it is
conditioned on, 0 for an unconditional generator; the classes a feature net predicts), classes
(names), image_shape (C, H, W: C = 1 grey or 3 RGB, H = W = 28, 32 or 64), output_range (of the
images its kind's `to_images` gives), and where it came from (dataset, parameter count).

Save/load, sampling, evaluation, serving and the registry all read this; nothing else says what
shape a model's images have. model.json files written before image_shape existed describe
1 x 28 x 28 grey models, which is what they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from imagegen.errors import ImagegenError

IMAGE_SIZES = (28, 32, 64)
# Side of the smallest feature map per image size: where a generator or decoder starts and an encoder or
# discriminator ends, `doublings(size)` stride-2 steps away from the image.
SEEDS = {28: 7, 32: 4, 64: 4}
CHANNELS = (1, 3)
LEGACY_SHAPE = (1, 28, 28)  # every model saved before model.json recorded a shape
REQUIRED = ("kind", "arch", "num_classes")


def doublings(size: int) -> int:
    """Stride-2 steps between the seed and the image side: 2 for 28, 3 for 32, 4 for 64."""
    return (size // SEEDS[size]).bit_length() - 1


def check_shape(shape) -> tuple[int, int, int]:
    """(C, H, W) as ints, or ValueError saying what is allowed."""
    try:
        c, h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"image shape {shape!r}: expected [channels, height, width]") from None
    if c not in CHANNELS or h != w or h not in IMAGE_SIZES:
        raise ValueError(f"image shape {c} x {h} x {w}: expected channels 1 or 3 and height = width in "
                         f"{', '.join(map(str, IMAGE_SIZES))}")
    return c, h, w


@dataclass(frozen=True)
class ModelDescription:
    kind: str
    arch: dict = field(default_factory=dict)
    num_classes: int = 0
    classes: tuple[str, ...] = ()
    image_shape: tuple[int, int, int] = LEGACY_SHAPE
    output_range: tuple[float, float] = (0.0, 1.0)
    dataset: str | None = None
    parameters: int | None = None

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.image_shape[1]

    @property
    def mode(self) -> str:
        """The PIL mode of its images: L (grey) or RGB."""
        return "L" if self.channels == 1 else "RGB"

    @property
    def shape_text(self) -> str:
        """e.g. '28 x 28 grey', '32 x 32 RGB'."""
        return f"{self.image_size} x {self.image_size} {'grey' if self.channels == 1 else 'RGB'}"

    def to_json(self) -> dict:
        out = {"kind": self.kind, "arch": dict(self.arch), "num_classes": self.num_classes,
               "classes": list(self.classes), "image_shape": list(self.image_shape),
               "output_range": list(self.output_range), "dataset": self.dataset, "parameters": self.parameters}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, raw, where: Path | str) -> ModelDescription:
        """The description in a parsed model.json; a one-line error naming `where` and the field otherwise."""
        if not isinstance(raw, dict):
            raise ImagegenError(f"{where}: expected a JSON object with kind, arch and num_classes")
        missing = [key for key in REQUIRED if key not in raw]
        if missing:
            raise ImagegenError(f"{where}: missing {', '.join(missing)}; expected kind, arch and num_classes")
        if not isinstance(raw["arch"], dict):
            raise ImagegenError(f"{where}: arch is {raw['arch']!r}; expected an object of architecture params")
        if not isinstance(raw["num_classes"], int) or isinstance(raw["num_classes"], bool) or raw["num_classes"] < 0:
            raise ImagegenError(f"{where}: num_classes is {raw['num_classes']!r}; expected an integer >= 0")
        try:
            shape = check_shape(raw.get("image_shape", LEGACY_SHAPE))
        except ValueError as exc:
            raise ImagegenError(f"{where}: image_shape: {exc}") from None
        return cls(kind=str(raw["kind"]), arch=dict(raw["arch"]), num_classes=raw["num_classes"],
                   classes=tuple(str(c) for c in raw.get("classes", ())), image_shape=shape,
                   output_range=tuple(raw.get("output_range", (0.0, 1.0))), dataset=raw.get("dataset"),
                   parameters=raw.get("parameters"))

"""Where a detector's region embeddings lie against the text embeddings of every class.

Why: ViLD-style classifiers score a region by the cosine of its embedding to each class's
text embedding over a temperature, trained with a softmax over the *base* classes and a
background only (ViLD, Eq. 1). A component of the region embeddings that every base text
embedding sees alike changes no base decision, so training leaves it where it is; a novel
text embedding that the component happens to favour then wins base objects, and which one
does is the luck of the seed. AP50 shows the damage, not the cause; this measures it on
ground-truth boxes, where localization cannot interfere:

- ``shared_length``: the length of the mean of the unit region embeddings (the mean
  resultant length, 0..1): near 1 when one direction carries most of every embedding.
- for base objects, the share whose nearest text embedding is their own class and the
  share nearest a novel class; the same with the shared direction removed (the mean
  subtracted, renormalized), which shows what that direction alone decides.
- the novel class whose text embedding has the largest cosine to the shared direction.

``ovdlab embeddings --checkpoint CKPT [--teacher]`` prints it for a trained detector (and
for the teacher's own crop embeddings of the same boxes); ``docs/benchmarks.md``,
"Temperature", has the measurements on shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ovdlab.platform.data.catalog import OVDDataset
from ovdlab.platform.data.images import ImageDecodeError, load_image
from ovdlab.platform.detector.inference import region_outputs
from ovdlab.platform.predict import Predictor
from ovdlab.platform.teacher.regions import embed_regions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingGeometry:
    """Percentages in 0..100; ``shared_length`` in 0..1 (see the module doc)."""

    objects: int
    base_objects: int
    shared_length: float
    base_right: float
    base_named_novel: float
    novel_right: float
    base_right_without_shared: float
    base_named_novel_without_shared: float
    novel_nearest_shared: str
    novel_nearest_shared_cos: float

    def summary(self) -> str:
        return (
            f"{self.objects} objects ({self.base_objects} base): shared direction {self.shared_length:.3f} of the "
            f"length; base objects nearest their class {self.base_right:.1f}%, a novel class "
            f"{self.base_named_novel:.1f}% (without the shared direction {self.base_right_without_shared:.1f}% / "
            f"{self.base_named_novel_without_shared:.1f}%); novel objects nearest their class {self.novel_right:.1f}%; "
            f"novel text nearest the shared direction: {self.novel_nearest_shared} ({self.novel_nearest_shared_cos:.2f})"
        )


def _nearest_shares(embeddings: Tensor, labels: Tensor, text: Tensor, is_novel: Tensor) -> tuple[float, float, float]:
    """(% base objects nearest their class, % base objects nearest a novel class, % novel objects nearest theirs)."""
    nearest = (embeddings @ text.t()).argmax(dim=1)
    base = ~is_novel[labels]
    right = nearest == labels

    def pct(mask: Tensor, of: Tensor) -> float:
        return 100.0 * float(mask[of].float().mean()) if bool(of.any()) else float("nan")

    return pct(right, base), pct(is_novel[nearest], base), pct(right, ~base)


def embedding_geometry(embeddings: Tensor, labels: Tensor, text: Tensor, is_novel: Tensor, names: list[str]) -> EmbeddingGeometry:
    """The geometry of region ``embeddings`` ``[N, D]`` of objects of class index ``labels``
    ``[N]`` against ``text`` ``[C, D]`` (``is_novel`` ``[C]``, ``names`` the C class names)."""
    if len(embeddings) == 0:
        raise ValueError("no objects to measure: the split has no (non-crowd) ground-truth boxes")
    unit = F.normalize(embeddings.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    mean = unit.mean(dim=0)
    base_right, named_novel, novel_right = _nearest_shares(unit, labels, text, is_novel)
    centred_right, centred_novel, _ = _nearest_shares(F.normalize(unit - mean, dim=-1), labels, text, is_novel)
    cos = text @ F.normalize(mean, dim=0)
    novel_cos = torch.where(is_novel, cos, torch.full_like(cos, -2.0))
    top = int(novel_cos.argmax()) if bool(is_novel.any()) else -1
    return EmbeddingGeometry(
        objects=len(unit),
        base_objects=int((~is_novel[labels]).sum()),
        shared_length=float(mean.norm()),
        base_right=base_right,
        base_named_novel=named_novel,
        novel_right=novel_right,
        base_right_without_shared=centred_right,
        base_named_novel_without_shared=centred_novel,
        novel_nearest_shared=names[top] if top >= 0 else "-",
        novel_nearest_shared_cos=float(cos[top]) if top >= 0 else float("nan"),
    )


def ground_truth_embeddings(
    predictor: Predictor, dataset: OVDDataset, max_images: int | None = None, teacher: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Region embeddings of the detector (and, with ``teacher``, the teacher's crop
    embeddings under the run's ``store.crop``) for every non-crowd ground-truth box of
    ``dataset``: ``(embeddings [N, D], class indices [N] into dataset.class_names,
    teacher embeddings [N, D] or None)``. Images that cannot be decoded are skipped with
    a warning naming them."""
    index = {cat_id: i for i, cat_id in enumerate(dataset.category_ids)}
    cfg = predictor.cfg
    objects = {i: [a for a in dataset.annotations(i) if not a.get("iscrowd")] for i in dataset.image_ids}
    image_ids = [i for i, anns in objects.items() if anns][:max_images]
    student, teacher_rows, labels, skipped = [], [], [], 0
    for image_id in tqdm(image_ids, desc="embed ground truth", unit="image", leave=False):
        anns, path = objects[image_id], dataset.image_path(image_id)
        try:
            image = load_image(path)
        except ImageDecodeError as err:
            skipped += 1
            log.warning("skipped %s: %s", path, err)
            continue
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
        out = region_outputs(predictor.model, image, boxes, cfg.model.min_size, cfg.model.max_size)
        if "embedding" not in out:
            raise ValueError(f"method {cfg.method.name} has no region embedding to measure")
        student.append(out["embedding"])
        if teacher:
            pixels = torch.from_numpy(image).permute(2, 0, 1).contiguous()  # the decoded image, uint8 [3, H, W]
            teacher_rows.append(embed_regions(predictor.teacher, [pixels], [boxes], cfg.store.crop, 256)[0])
        labels += [index[a["category_id"]] for a in anns]
    if skipped:
        log.warning("%d image(s) could not be decoded and were skipped", skipped)
    if not student:
        raise ValueError(f"{dataset.ann_json}: no decodable image with a ground-truth box")
    return torch.cat(student), torch.tensor(labels), (torch.cat(teacher_rows) if teacher else None)


def measure_checkpoint(
    predictor: Predictor, dataset: OVDDataset, max_images: int | None = None, teacher: bool = False
) -> dict[str, EmbeddingGeometry]:
    """``{"detector": ..., "teacher": ...}`` (teacher only when asked) on ``dataset``'s
    ground-truth boxes against the text embeddings of all its classes."""
    names = dataset.class_names
    cats = {c["id"]: c for c in dataset.categories}
    is_novel = torch.tensor([cats[i]["split"] == "novel" for i in dataset.category_ids])
    text = predictor.text_embeddings(names)
    student, labels, teacher_rows = ground_truth_embeddings(predictor, dataset, max_images, teacher)
    out = {"detector": embedding_geometry(student, labels, text, is_novel, names)}
    if teacher_rows is not None:
        out["teacher"] = embedding_geometry(teacher_rows, labels, text, is_novel, names)
    return out

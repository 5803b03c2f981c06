"""The extraction stages as plain functions over image rows, shared by Ray and the in-process loop.

A row is one image on its way through the stages (a dict):

    image_id, path, height, width, annotations (JSON text of the image's boxes)
    image        uint8 [H, W, 3], after ``decode``
    boxes        float32 [N, 4] xyxy original pixels, scores float32 [N],
    x_<name>     float32 [N] per extra column, after ``propose``
    embeddings   float16 [N, D], after ``embed``
    stage, error ("" while the row is healthy)

A stage never raises for a bad image: it sets ``stage`` and ``error`` on the row and
passes it on untouched; the write stage turns such rows into the store's ``failures``
table. The Ray actors in ``extract.py`` and :func:`ovdlab.platform.pipelines.extract.extract_in_process`
call the very same functions, so the benchmark compares the executors, not two
implementations. Only :func:`embed_rows` needs torch, and imports it when called: the
decode tasks and the writer actor never load it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ovdlab.platform.data.images import read_image
from ovdlab.platform.proposals.base import ProposalSource, Proposals, fit_to_image
from ovdlab.platform.store.schema import Failure, ImageRegions
from ovdlab.platform.store.writer import RegionStoreWriter

if TYPE_CHECKING:
    import torch

    from ovdlab.platform.teacher.loading import Teacher

Row = dict[str, Any]
EXTRA_PREFIX = "x_"
EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)
ANNOTATION_KEYS = ("bbox", "category_id", "iscrowd")


def item_for(image_id: int, path: str, info: dict[str, Any], annotations: list[dict[str, Any]]) -> Row:
    """The input row of one image; annotations keep only what proposal sources read."""
    slim = [{k: a[k] for k in ANNOTATION_KEYS if k in a} for a in annotations]
    return {
        "image_id": int(image_id),
        "path": str(path),
        "height": int(info["height"]),
        "width": int(info["width"]),
        "annotations": json.dumps(slim, separators=(",", ":")),
    }


def failed(row: Row) -> bool:
    return bool(row.get("error"))


def _fail(row: Row, stage: str, err: BaseException | str) -> Row:
    message = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    row["stage"], row["error"] = stage, message
    return row


def _healthy(row: Row) -> Row:
    row.setdefault("stage", "")
    row.setdefault("error", "")
    return row


def decode_rows(rows: Iterable[Row]) -> list[Row]:
    """Decode every image once (``read_image`` never raises); check it has the annotated size.

    Annotations are in the coordinates of the annotated ``width`` x ``height``; a file
    that decodes to another size (a replaced or re-rotated file) would put every box in
    the wrong place, so it is a failure, not a silent misalignment.
    """
    out = []
    for row in rows:
        row = _healthy(dict(row))
        row["image"] = EMPTY_IMAGE
        if failed(row):
            out.append(row)
            continue
        decoded = read_image(row["path"])
        if not decoded.ok:
            out.append(_fail(row, "decode", decoded.error or "cannot decode"))
            continue
        image = decoded.image
        assert image is not None
        if image.shape[:2] != (row["height"], row["width"]):
            out.append(
                _fail(
                    row,
                    "decode",
                    f"{row['path']}: decoded to {image.shape[1]}x{image.shape[0]} but the annotation file "
                    f"says {row['width']}x{row['height']}",
                )
            )
            continue
        row["image"] = image
        out.append(row)
    return out


def _set_proposals(row: Row, proposals: Proposals, extra_names: Sequence[str]) -> None:
    row["boxes"] = proposals.boxes
    row["scores"] = proposals.scores
    for name in extra_names:
        row[EXTRA_PREFIX + name] = proposals.extras[name]


def propose_rows(source: ProposalSource, rows: Iterable[Row]) -> list[Row]:
    """Proposals of every healthy row, fitted to its image (:func:`fit_to_image`)."""
    empty = Proposals.empty(source.extra_names)
    out = []
    for row in rows:
        row = _healthy(dict(row))
        _set_proposals(row, empty, source.extra_names)
        if failed(row):
            out.append(row)
            continue
        try:
            image = np.asarray(row["image"])
            proposals = source.propose(image, row["image_id"], json.loads(row["annotations"]))
            missing = set(source.extra_names) - set(proposals.extras)
            if missing:
                raise ValueError(f"source {source.name!r} returned no {sorted(missing)} column(s)")
            proposals = fit_to_image(proposals, image.shape[0], image.shape[1])
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the run
            _fail(row, "proposals", err)
        else:
            _set_proposals(row, proposals, source.extra_names)
        out.append(row)
    return out


def _image_tensor(image: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def _boxes_tensor(boxes: np.ndarray) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4))


def embed_rows(teacher: "Teacher", crop: str, batch_size: int, rows: Iterable[Row]) -> list[Row]:
    """Teacher embeddings (float16) of every healthy row's boxes, crops batched across images.

    The whole batch goes through :func:`embed_regions` in one call; should that fail,
    images are retried one by one so the failure is pinned on the image that caused it.
    The decoded image is dropped from the row afterwards (the write stage does not need it).
    """
    from ovdlab.platform.teacher.regions import embed_regions

    rows = [_healthy(dict(r)) for r in rows]
    empty = np.zeros((0, teacher.embed_dim), np.float16)
    for row in rows:
        row["embeddings"] = empty
    todo = [r for r in rows if not failed(r)]
    if todo:
        try:
            embs = embed_regions(
                teacher, [_image_tensor(r["image"]) for r in todo], [_boxes_tensor(r["boxes"]) for r in todo], crop, batch_size
            )
            for row, emb in zip(todo, embs):
                row["embeddings"] = emb.numpy().astype(np.float16)
        except Exception:  # noqa: BLE001 - isolate the bad image below
            for row in todo:
                try:
                    emb = embed_regions(teacher, [_image_tensor(row["image"])], [_boxes_tensor(row["boxes"])], crop, batch_size)[0]
                    row["embeddings"] = emb.numpy().astype(np.float16)
                except Exception as err:  # noqa: BLE001 - recorded as the image's failure
                    _fail(row, "embed", err)
    for row in rows:
        row.pop("image", None)
    return rows


def _region_row(row: Row, extra_names: Sequence[str]) -> ImageRegions:
    return ImageRegions(
        image_id=int(row["image_id"]),
        boxes=np.asarray(row["boxes"], np.float32).reshape(-1, 4),
        scores=np.asarray(row["scores"], np.float32).reshape(-1),
        embeddings=np.asarray(row["embeddings"]),
        extras={name: np.asarray(row[EXTRA_PREFIX + name], np.float32).reshape(-1) for name in extra_names},
    )


def write_rows(writer: RegionStoreWriter, rows: Iterable[Row]) -> list[Row]:
    """Write healthy rows as one part and failed rows to ``failures``; returns per-image results.

    Each region row is validated on its own first (:meth:`ImageRegions.validate`), so a
    row the store would reject becomes a failure of its image instead of losing the part.
    """
    regions: list[ImageRegions] = []
    failures: list[Failure] = []
    results: list[Row] = []
    for row in rows:
        row = _healthy(dict(row))
        if not failed(row):
            try:
                region = _region_row(row, writer.extras)
                region.validate(writer.embed_dim, writer.extras)
            except (ValueError, KeyError) as err:
                _fail(row, "write", err)
            else:
                regions.append(region)
                results.append({"image_id": region.image_id, "regions": region.num_regions, "failed": False})
                continue
        failures.append(Failure(int(row["image_id"]), str(row["path"]), str(row["stage"]), str(row["error"])))
        results.append({"image_id": int(row["image_id"]), "regions": 0, "failed": True})
    writer.write_part(regions)
    writer.write_failures(failures)
    return results


# -- Ray Data batches <-> rows ---------------------------------------------------------


def batch_to_rows(batch: dict[str, np.ndarray]) -> list[Row]:
    """A numpy batch (column -> array) as a list of row dicts with Python scalars."""
    if not batch:
        return []
    n = len(next(iter(batch.values())))
    rows: list[Row] = [{} for _ in range(n)]
    for name, column in batch.items():
        for i in range(n):
            value = column[i]
            if isinstance(value, np.generic):
                value = value.item()
            rows[i][name] = value
    return rows


def rows_to_batch(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows back to a numpy batch; array-valued columns become object arrays (ragged tensors)."""
    if not rows:
        return {}
    out: dict[str, np.ndarray] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if isinstance(values[0], np.ndarray):
            column = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                column[i] = v
            out[name] = column
        elif isinstance(values[0], (bool, np.bool_)):
            out[name] = np.asarray(values, dtype=bool)
        elif isinstance(values[0], (int, np.integer)):
            out[name] = np.asarray(values, dtype=np.int64)
        else:
            out[name] = np.asarray([str(v) for v in values], dtype=object)
    return out

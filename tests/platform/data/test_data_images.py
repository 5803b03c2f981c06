"""Image decoding: every pixel mode becomes (H, W, 3) uint8 RGB; bad files give reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdlab.platform.data.images import DecodedImage, ImageDecodeError, load_image, read_image


def _mode(path: Path) -> str:
    with Image.open(path) as img:
        return img.mode


def _ok(path: Path) -> np.ndarray:
    result = read_image(path)
    assert isinstance(result, DecodedImage) and result.ok, result.error
    assert result.error is None and result.path == str(path)
    image = result.image
    assert image is not None and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    return image


def _failed(path: Path) -> str:
    result = read_image(path)
    assert not result.ok and result.image is None and result.error
    assert str(path) in result.error
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path) and info.value.reason in str(info.value)
    return result.error


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 17, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    assert np.array_equal(_ok(tmp_path / "rgb.png"), pixels)
    assert np.array_equal(load_image(tmp_path / "rgb.png"), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    out = _ok(tmp_path / "gray.png")
    assert out.shape == (6, 10, 3)
    assert all(np.array_equal(out[..., c], gray) for c in range(3))


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 0)
    rgba[1, 0] = (200, 100, 50, 128)
    rgba[1, 1] = (255, 255, 255, 51)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = _ok(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[1, 0].tolist() == [round(200 * 128 / 255), round(100 * 128 / 255), round(50 * 128 / 255)]
    assert out[1, 1].tolist() == [51, 51, 51]


def test_gray_with_alpha(tmp_path: Path) -> None:
    la = np.array([[[100, 255], [100, 0]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert _ok(tmp_path / "la.png")[0].tolist() == [[100, 100, 100], [0, 0, 0]]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png")
    assert _ok(tmp_path / "p.png")[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    img.save(tmp_path / "p_transparent.png", transparency=1)
    assert _mode(tmp_path / "p_transparent.png") == "P"
    assert _ok(tmp_path / "p_transparent.png")[0].tolist() == [[255, 0, 0], [0, 0, 0], [0, 0, 255]]


def test_cmyk(tmp_path: Path) -> None:
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "cmyk.tif")
    assert _mode(tmp_path / "cmyk.tif") == "CMYK"
    assert _ok(tmp_path / "cmyk.tif")[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 0]]
    Image.fromarray(cmyk, mode="CMYK").resize((30, 10)).save(tmp_path / "cmyk.jpg", quality=95)
    assert _ok(tmp_path / "cmyk.jpg").shape == (10, 30, 3)


def test_sixteen_bit_is_scaled_to_eight_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert _mode(tmp_path / "g16.png").startswith("I")
    assert _ok(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 100, 255]


def test_thirty_two_bit_integer_mode(tmp_path: Path) -> None:
    values = np.array([[-5, 257 * 50, 70000]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i32.tif")
    assert _mode(tmp_path / "i32.tif") == "I"
    assert _ok(tmp_path / "i32.tif")[0, :, 0].tolist() == [0, 50, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    out = _ok(tmp_path / "rotated.jpg")
    assert out.shape == (40, 20, 3)
    top, bottom = out[:15].reshape(-1, 3).mean(axis=0), out[25:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_float_mode_is_refused_with_reason(tmp_path: Path) -> None:
    Image.fromarray(np.ones((2, 2), dtype=np.float32), mode="F").save(tmp_path / "float.tif")
    assert "unsupported pixel mode 'F'" in _failed(tmp_path / "float.tif")


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"truncated.{suffix}"
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "cannot decode image" in _failed(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8).tobytes())
    assert "cannot decode image" in _failed(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    assert "file not found" in _failed(tmp_path / "nope.png")
    assert "not a regular file" in _failed(tmp_path)

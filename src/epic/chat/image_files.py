"""Opening an image file a person names or uploads: common raster formats only, with size and pixel limits."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image

from epic.chat.answers import ChatError, format_bytes

# what `open_image` reads: common raster formats only (never EPS, which Pillow hands to Ghostscript, nor rarer decoders)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers multi-picture JPEGs (MPO)
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning level (it refuses only at twice that)


def open_image(source: Path | str, max_bytes: int | None = None) -> Image.Image:
    """Open an image file as RGB, or raise `ChatError` naming the file: missing, too large (bytes, or pixels: more
    than `MAX_PIXELS`, checked from the header before decoding), or not an image in one of `IMAGE_FORMATS`."""
    path = Path(source)
    if not path.is_file():
        raise ChatError(f"image file not found: {path}")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ChatError(f"{path.name} is {format_bytes(size)}, over the upload limit of {format_bytes(max_bytes)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with a message
            with Image.open(path, formats=IMAGE_FORMATS) as opened:
                if opened.width * opened.height > MAX_PIXELS:
                    raise ChatError(
                        f"{path.name} has too many pixels ({opened.width}x{opened.height}, more than {MAX_PIXELS:,})"
                    )
                return opened.convert("RGB")
    except Image.DecompressionBombError as error:
        raise ChatError(f"{path.name} has too many pixels ({error})") from None
    except OSError:
        raise ChatError(
            f"{path.name} is not an image in a format Pillow can read here ({', '.join(IMAGE_FORMATS)})"
        ) from None

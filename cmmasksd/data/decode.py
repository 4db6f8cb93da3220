"""Images decoded and letterboxed for `prepare_split`, in a pool of worker processes, in order.

Workers do the CPU work (JPEG decoding, resizing, mask rasterising); the parent gets the results
in task order, a few tasks ahead, so memory stays flat whatever the split's size.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cmmasksd.data.letterbox import LetterboxMeta, letterbox_image, letterbox_mask

_IN_FLIGHT_PER_WORKER = 4  # decoded images waiting for the parent, per worker: bounds memory


class ImageTask(NamedTuple):
    """What a worker needs to decode one image and its objects' masks."""

    path: str
    height: int
    width: int
    size: int
    rles: list[dict[str, Any]]


def decoded(tasks: Iterable[ImageTask], workers: int) -> Iterator[tuple[np.ndarray, np.ndarray] | str]:
    """`_decode` of each task, in order; with workers > 1 in a process pool, a few tasks ahead."""
    if workers == 1:
        yield from map(_decode, tasks)
        return
    with ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(pool.submit(_decode, task))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _exit_with_parent(parent: int) -> None:
    """Pool worker initializer: exit once the parent is gone.

    A parent that is killed cannot shut its pool down, and its idle workers would wait for work
    forever, holding memory and the pipes of whoever started the parent.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _decode(task: ImageTask) -> tuple[np.ndarray, np.ndarray] | str:
    """The letterboxed image and its objects' packed letterboxed masks, or why the image is unusable."""
    loaded = _letterboxed(Path(task.path), task.height, task.width, task.size)
    if isinstance(loaded, str):
        return loaded
    pixels, meta = loaded
    masks = [np.packbits(letterbox_mask(mask_utils.decode(rle).astype(bool), meta), axis=-1) for rle in task.rles]
    return pixels, np.stack(masks)


def _letterboxed(path: Path, height: int, width: int, size: int) -> tuple[np.ndarray, LetterboxMeta] | str:
    """The letterboxed image, or why it cannot be used."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes everything, so a truncated JPEG fails here
            if (img.height, img.width) != (height, width):
                return f"bad image: {img.height}x{img.width}, instances.json says {height}x{width}"
            return letterbox_image(img, size)
    except FileNotFoundError:
        return "missing image file"
    except OSError as err:  # truncated or not an image
        return f"bad image: {err}"

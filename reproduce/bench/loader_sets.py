"""The image sets that `reproduce bench-loaders` (reproduce/bench/loaders.py) streams, made in a
temporary folder: the Imagenette validation set as a class-folder tree, or an ImageNet-sized set
drawn (seeded) from the Imagenette training archives."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from pathlib import Path

from reproduce.errors import Refused
from reproduce.provenance import REPO

SHARED = REPO.parent / "shared" / "data"


def make_imagenet_sized(root: Path, count: int, seed: int = 0) -> Path:
    """tree/train/<class>/*.JPEG: `count` Imagenette training images picked evenly over both
    archives, each resized to a square of side uniform in 333..500 (seeded), saved at quality 90;
    tree/val/<class>/: one image per class (not measured)."""
    from PIL import Image

    archives = sorted(SHARED.glob("imagenette-224-train-*of2.tar.gz"))
    if len(archives) != 2:
        raise FileNotFoundError(f"the two imagenette-224-train-*of2.tar.gz archives are not in {SHARED}")
    names = []
    for archive in archives:
        with tarfile.open(archive) as tf:
            names += [(archive, m.name) for m in tf if m.isfile() and m.name.endswith(".JPEG")]
    names.sort(key=lambda item: item[1])
    picked = {names[i * len(names) // count] for i in range(min(count, len(names)))}
    rng, tree = random.Random(seed), root / "tree"
    for archive in archives:
        with tarfile.open(archive) as tf:
            for member in tf:
                if (archive, member.name) not in picked:
                    continue
                wnid = Path(member.name).parent.name
                side = rng.randint(333, 500)  # drawn in archive order: the same sizes every time
                image = (
                    Image.open(io.BytesIO(tf.extractfile(member).read()))
                    .convert("RGB")
                    .resize((side, side), Image.BICUBIC)
                )
                for split in ("train",) + (("val",) if not (tree / "val" / wnid).exists() else ()):
                    (tree / split / wnid).mkdir(parents=True, exist_ok=True)
                    image.save(tree / split / wnid / Path(member.name).name, quality=90)
    return tree


class SourceRefused(Refused, ValueError):
    """--source is not a set of images this benchmark reads; the message is one line naming the fix."""


def make_tree(source: Path, root: Path) -> Path:
    """train/<class>/* = every image of the source; val/<class>/* = one image per class (the
    loaders need a val/ folder; it is not measured)."""
    if source.is_dir():
        images = source
    else:
        try:
            with tarfile.open(source) as tf:
                tf.extractall(root / "unpacked", filter="data")
        except tarfile.TarError as err:
            raise SourceRefused(
                f"--source {source} is not a .tar.gz of <split>/<class>/*.JPEG ({' '.join(str(err).split())}); give one, "
                "or a folder of "
                "<class>/*.JPEG"
            ) from None
        tops = [p for p in (root / "unpacked").iterdir() if p.is_dir()]
        if len(tops) != 1:
            raise SourceRefused(
                f"--source {source} holds {len(tops)} top folders, not one <split>/ folder of <class>/*.JPEG; "
                "give a .tar.gz of one split, or a folder of <class>/*.JPEG"
            )
        images = tops[0]
    classes = sorted(p for p in images.iterdir() if p.is_dir())
    empty = next((c for c in classes if not any(f.is_file() for f in c.iterdir())), None)
    if not classes or empty is not None:
        inner = next((d for d in (empty or images).iterdir() if d.is_dir()), None) if classes else None
        hint = f"give the folder whose subfolders hold the images, e.g. --source {inner.parent}" if inner else ""
        where = f"its folder {empty.name}/ holds no image files" if empty is not None else "it has no class folders"
        raise SourceRefused(
            f"--source {source} is not a folder of <class>/*.JPEG ({where}); "
            + (hint or "give a folder of <class>/*.JPEG or a .tar.gz of <split>/<class>/*.JPEG")
        )
    tree = root / "tree"
    (tree / "train").mkdir(parents=True)
    for folder in classes:
        (tree / "train" / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
        (tree / "val" / folder.name).mkdir(parents=True)
        first = sorted(f for f in folder.iterdir() if f.is_file())[0]
        shutil.copy(first, tree / "val" / folder.name / first.name)
    return tree

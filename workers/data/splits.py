"""The official train/test splits of UCF101 and HMDB51 -> the `split` of each video.

* UCF101 (`ucfTrainTestlist/`): `trainlist0K.txt` lines `Class/v_Class_g08_c01.avi 1`,
  `testlist0K.txt` lines `Class/v_Class_g01_c01.avi`.
* HMDB51 (`testTrainMulti_7030_splits/`): `<class>_test_splitK.txt` lines `video.avi N`,
  N = 1 train, 2 test, 0 not used by split K (recorded as `unused`).

The paper evaluates on split 1 of each; `split_index` picks another.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from workers.data.format import DataError

TRAIN, TEST, UNUSED = "train", "test", "unused"
_HMDB51_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<k>\d+)\.txt$")
_HMDB51_IDS = {"1": TRAIN, "2": TEST, "0": UNUSED}


@dataclass(kw_only=True)
class SplitTable:
    """Split names of the videos of one official split, keyed by `class/video` (lower case)."""

    dataset: str  # "ucf101" or "hmdb51"
    split_index: int
    splits: dict[str, str]
    _by_name: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Video names are unique across classes in both data sets, so a file found without
        # its class folder (or with differently cased folders) still finds its split.
        self._by_name = {key.rsplit("/", 1)[-1]: split for key, split in self.splits.items()}

    def __len__(self) -> int:
        return len(self.splits)

    def split_of(self, relative_path: str) -> str | None:
        """The split of a video given its path relative to the data set folder; None if unlisted."""
        parts = relative_path.replace("\\", "/").lower().split("/")
        return self.splits.get("/".join(parts[-2:])) or self._by_name.get(parts[-1])


def _lines(path: str) -> list[tuple[int, list[str]]]:
    with open(path, encoding="utf-8") as f:
        return [(n, line.split()) for n, line in enumerate(f, start=1) if line.strip()]


def read_ucf101(splits_dir: str, *, split_index: int = 1) -> SplitTable:
    """UCF101's `trainlist0K.txt` and `testlist0K.txt` under `splits_dir`."""
    splits: dict[str, str] = {}
    for split, name in ((TRAIN, f"trainlist{split_index:02d}.txt"), (TEST, f"testlist{split_index:02d}.txt")):
        path = os.path.join(splits_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"{path}: UCF101 split file not found")
        for line, fields in _lines(path):
            key = fields[0].replace("\\", "/").lower()
            if "/" not in key:
                raise DataError(f"{path}:{line}: expected Class/video.avi, got {fields[0]!r}")
            if splits.get(key, split) != split:
                raise DataError(f"{path}:{line}: {fields[0]} is in both the train and the test list")
            splits[key] = split
    return SplitTable(dataset="ucf101", split_index=split_index, splits=splits)


def read_hmdb51(splits_dir: str, *, split_index: int = 1) -> SplitTable:
    """HMDB51's `<class>_test_splitK.txt` files under `splits_dir`."""
    splits: dict[str, str] = {}
    names = sorted(os.listdir(splits_dir))
    files = [(m["cls"], n) for n in names if (m := _HMDB51_FILE.match(n)) and int(m["k"]) == split_index]
    if not files:
        raise DataError(f"{splits_dir}: no HMDB51 split files *_test_split{split_index}.txt")
    for cls, name in files:
        path = os.path.join(splits_dir, name)
        for line, fields in _lines(path):
            if len(fields) != 2 or fields[1] not in _HMDB51_IDS:
                raise DataError(f"{path}:{line}: expected 'video.avi 0|1|2', got {' '.join(fields)!r}")
            splits[f"{cls}/{fields[0]}".lower()] = _HMDB51_IDS[fields[1]]
    return SplitTable(dataset="hmdb51", split_index=split_index, splits=splits)


def read_splits(splits_dir: str, *, split_index: int = 1) -> SplitTable:
    """The official split `split_index` from a UCF101 or HMDB51 split folder (detected by its files)."""
    if split_index < 1:
        raise DataError(f"split index must be >= 1, got {split_index}")
    if not os.path.isdir(splits_dir):
        raise DataError(f"{splits_dir}: split folder not found")
    names = os.listdir(splits_dir)
    if any(n.startswith(("trainlist", "testlist")) for n in names):
        return read_ucf101(splits_dir, split_index=split_index)
    if any(_HMDB51_FILE.match(n) for n in names):
        return read_hmdb51(splits_dir, split_index=split_index)
    raise DataError(
        f"{splits_dir}: neither UCF101 (trainlist0{split_index}.txt, testlist0{split_index}.txt) "
        f"nor HMDB51 (<class>_test_split{split_index}.txt) split files"
    )

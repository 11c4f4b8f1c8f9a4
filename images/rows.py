"""
images/rows.py — the printouts of rows read from a file, for a model that reads paper ECGs too (train.py --images
--data, eval.py with such a checkpoint). A row of modality "both" is answered from its record and then its printout, a
row of modality "image" from the printout alone (data.llava_row marks them). The printout is the row's `image`, read
under the image root; where no image root is given or the row names no image, it is drawn from the row's record as
synthetic printouts are (render_ecg, the first 10 s), so GEM's rows train without their PNG folder.
"""
from collections import OrderedDict

from data import RowECGReader, inside, load_ecg, record_length, row_paths
from images.paper import WIDTH_MM, read_image, render_ecg

PRINTOUT_S = 10.0   # a printout shows 10 s (four 2.5 s columns); only that much of a long record is read
PRINTOUT_CACHE = 64  # printouts kept: an A4 page scanned at 300 dpi is 26 MB as pixels, a 10 s ECG some 50 kB


class PrintoutReader(RowECGReader):
    """RowECGReader + each row's printouts, after its ECGs. width: the image encoder's input width in pixels; a drawn
    printout is rendered at that width, so it is not resampled again. The last PRINTOUT_CACHE printouts are kept."""

    def __init__(self, root, fs=100, cache_size=1024, image_root=None, width=224):
        super().__init__(root, fs, cache_size)
        self.image_root, self.px_per_mm = image_root or None, width / WIDTH_MM
        self.printouts = OrderedDict()   # ("image" | "record", path) -> uint8 (H, W, 3), least recently used first

    def __call__(self, row):
        modality = row.get("modality", "signal")
        ecgs = super().__call__(row) if modality != "image" else []
        return ecgs + ([self.printout(source) for source in self.sources(row)] if modality != "signal" else [])

    def sources(self, row):
        """Where the row's printouts come from: its image file, or each of its records drawn."""
        if row.get("image") and self.image_root:
            return [("image", row["image"])]
        if row_paths(row):
            return [("record", path) for path in row_paths(row)]
        raise ValueError(f"{row['image']}: a printout with no record beside it is read from the image root; "
                         "give --image_root (eval.py: --image-root), the folder its path is under")

    def printout(self, source):
        if source not in self.printouts:
            self.printouts[source] = self.read(*source)
            while len(self.printouts) > PRINTOUT_CACHE:
                self.printouts.popitem(last=False)
        self.printouts.move_to_end(source)
        return self.printouts[source]

    def read(self, kind, rel):
        """The image file under the image root, or the record under the ECG root drawn as a printout."""
        if kind == "image":
            return read_image(inside(self.image_root, rel))
        path = inside(self.root, rel)
        length = record_length(path)   # (samples, fs) from a WFDB header: read only the first PRINTOUT_S
        end = min(length[0], int(PRINTOUT_S * length[1])) if length else None
        rec = load_ecg(path, end=end, root=self.root)
        return render_ecg(rec.signal, rec.fs, list(rec.leads), px_per_mm=self.px_per_mm, seconds=PRINTOUT_S)

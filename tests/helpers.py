"""What several test files share: a synthetic dataset written to disk as any anyECG-format tool reads it."""
import json
import os

import numpy as np


def write_dataset(ds, out_dir, name="data"):
    """Every record of a synthetic dataset as WFDB (16-bit) under out_dir/<path>, and its rows as out_dir/<name>.json.
    -> the JSON file's path"""
    import wfdb
    for path, spec in ds.specs.items():
        rec, _ = spec.generate()
        folder = os.path.join(out_dir, os.path.dirname(path))
        os.makedirs(folder, exist_ok=True)
        wfdb.wrsamp(os.path.basename(path), fs=rec.fs, units=["mV"] * len(rec.leads), sig_name=rec.leads,
                    p_signal=rec.signal.T.astype(np.float64), fmt=["16"] * len(rec.leads), write_dir=folder)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump(ds.rows, f, indent=1)
    return json_path

"""What several test files share: a synthetic dataset written to disk as any anyECG-format tool reads it, and a saved
checkpoint folder edited as a damaged or hand-edited one would be."""
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


def edit_folder(folder, edit_state=None, edit_config=None):
    """A saved checkpoint folder's model.safetensors and config.json, each passed to its edit function (which changes
    the dict in place) and written back. -> folder"""
    from safetensors.torch import load_file, save_file
    if edit_state:
        state = load_file(folder / "model.safetensors")
        edit_state(state)
        save_file(state, folder / "model.safetensors")
    if edit_config:
        cfg = json.loads((folder / "config.json").read_text())
        edit_config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder

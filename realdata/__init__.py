"""Real databases (MIT-BIH, European ST-T, MIT-BIH ST Change, PTB-XL, MIMIC-IV-ECG, ECG-QA) turned into anyECG-format
rows for train.py --data and eval.py: python -m realdata.prepare SOURCE --root DIR --out rows.json."""

"""ECGs on paper, GEM's second modality: the printout renderer and SVG plots (paper.py), the image encoder and the
CLIP loader (vit.py), and the chat model that reads images beside ECGs (chat.py)."""

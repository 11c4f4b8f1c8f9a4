"""
images/chat.py — the chat model that also reads paper ECGs (GEM's second modality): chat.ECGChat with an image
encoder (images/vit.py) and its own projector. A prompt's inputs are then ECGRecords and images (uint8 RGB
(H, W, 3)); each image fills an <img> block of the encoder's num_tokens placeholders, after the ECG blocks, exactly as
an ECG fills its <ecg> block. The checkpoint folder holds the image parts beside the rest (img_encoder.*,
img_projector.*); `load_chat` loads either kind of folder.
"""
from dataclasses import asdict
from pathlib import Path

from chat import ECGChat, split_inputs
from data import read_json
from ecg_encoder import Projector
from images.vit import ImageEncoder, ImageEncoderConfig


class ImageChat(ECGChat):
    """ECGChat + image_encoder (images -> (B, n, d)) + image_projector. train_image_encoder=False keeps the image
    encoder frozen in every stage (GEM keeps its pretrained CLIP tower so); otherwise it trains when the ECG encoder
    does."""

    def __init__(self, llm, encoder, tokenizer, max_seq_len=None, chat_format="auto", label_ecgs=False,
                 image_encoder=None, train_image_encoder=True, ecg_seconds=False, name_last_ecg=False):
        super().__init__(llm, encoder, tokenizer, max_seq_len, chat_format, label_ecgs, ecg_seconds=ecg_seconds,
                         name_last_ecg=name_last_ecg)
        w = llm.embed_tokens.weight
        self.image_encoder = image_encoder
        self.image_projector = Projector(image_encoder.cfg.d_model, llm.config.hidden_size).to(w.device, w.dtype)
        self.img_token_id = tokenizer.added[self.format.marks[5]]
        self.train_image_encoder = train_image_encoder

    def check_inputs(self, inputs):
        pass   # ECGRecords and images; an input that is neither is refused by the image encoder (not an RGB image)

    def placeholders(self, inputs):
        """The ECG blocks, then one '<img><img_token> x n</img>' block per image."""
        ecgs, images = split_inputs(inputs)
        start, end, token = self.format.marks[3:]
        return super().placeholders(ecgs) + (start + token * self.image_encoder.num_tokens + end) * len(images)

    def encode_images(self, images):
        """[uint8 RGB (H, W, 3), ...] -> [(n_tokens, C_llm), ...]"""
        return list(self.image_projector(self.image_encoder(images))) if images else []

    def embed(self, input_ids, inputs):
        x = super().embed(input_ids, inputs)                                         # the ECG blocks filled
        images = [split_inputs(sample)[1] for sample in inputs]
        return self.splice(x, input_ids == self.img_token_id, images, self.encode_images, "image",
                           self.format.marks[5])

    def set_trainable(self, encoder=True, projector=True, llm=False, lora=True):
        super().set_trainable(encoder, projector, llm, lora)
        for module, on in [(self.image_encoder, encoder and self.train_image_encoder),
                           (self.image_projector, projector)]:
            for p in module.parameters():
                p.requires_grad_(on)

    def parts(self):
        return super().parts() | {"img_encoder.": self.image_encoder, "img_projector.": self.image_projector}

    def settings(self):
        return super().settings() | {"image_encoder": asdict(self.image_encoder.cfg)}

    SECTIONS = ECGChat.SECTIONS | {"image_encoder": ImageEncoderConfig}

    @classmethod
    def from_settings(cls, llm, tokenizer, settings):
        image_encoder = ImageEncoder(ImageEncoderConfig(**settings["image_encoder"]))
        return super().from_settings(llm, tokenizer, settings, image_encoder=image_encoder)


def load_chat(ckpt_dir, dtype=None, device=None):
    """A checkpoint folder train.py wrote, with or without the image modality, as the chat model it holds."""
    settings = read_json(Path(ckpt_dir) / "config.json").get("nanoecg", {})
    return (ImageChat if "image_encoder" in settings else ECGChat).load(ckpt_dir, dtype, device)

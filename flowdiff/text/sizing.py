"""What captioned data fixes of a model's config before it is built: a text encoder (the trained
one unless the config names one), what the captions fix of it, and the network's ``text_dim``.
The CLI calls :func:`size_text` beside :func:`flowdiff.nets.base.size_from_data`."""

from __future__ import annotations

import inspect

from jsonargparse import Namespace

from flowdiff.config import import_class
from flowdiff.utils import UsageError

DEFAULT_TEXT_ENCODER = "flowdiff.text.TrainedTextEncoder"


def size_text(model, datamodule) -> None:
    """Give captioned data a text encoder (the trained one unless the config names one or the
    data holds the captions' embeddings: then the precomputed one), fill in
    what the captions fix of it (a vocabulary), and give the network the encoder's width as its
    ``text_dim``; refuse a text encoder on data without captions."""
    encoder = model.get("text_encoder")
    if not datamodule.captioned:
        if encoder is not None:
            raise UsageError(
                f"model.text_encoder is set but the data has no captions ({datamodule.conditioning}"
                " conditioning); remove it or use captioned data"
            )
        return
    embeddings = getattr(datamodule, "text_embeddings", None)  # given beside the captions
    if encoder is None and embeddings:
        encoder = model["text_encoder"] = Namespace(
            class_path="flowdiff.text.PrecomputedTextEncoder", init_args=Namespace(path=embeddings)
        )
    if encoder is None:
        encoder = model["text_encoder"] = Namespace(class_path=DEFAULT_TEXT_ENCODER)
    if encoder.get("init_args") is None:
        encoder["init_args"] = Namespace()
    net = model["net"]
    parameters = inspect.signature(import_class(net["class_path"]).__init__).parameters
    if "text_dim" not in parameters:  # before the captions: an image folder decodes to split
        raise UsageError(
            f"the data is captioned but {net['class_path']} reads no text; use a network with "
            "text_dim (flowdiff.nets.dit.DiT, flowdiff.nets.unet.UNet)"
        )
    cls = import_class(encoder["class_path"])
    args = encoder["init_args"]
    plain = args.as_dict() if isinstance(args, Namespace) else dict(args)
    cls.from_data(plain, datamodule.captions())
    for key, value in plain.items():
        args[key] = value
    net["init_args"]["text_dim"] = cls.width(plain)

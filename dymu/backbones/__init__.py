"""Built-in backbones; importing this package registers them in :data:`dymu.anchor.BACKBONES`."""

from . import mobilenet, resnet, resnet9, small  # noqa: F401

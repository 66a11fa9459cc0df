"""vmamba.seg: semantic segmentation in pure PyTorch over any timm feature backbone (ours included).

    from vmamba.seg import create_segmentation_model, predict_sliding
    model = create_segmentation_model("vmamba_tiny_s1l8", num_classes=150, decoder="upernet", aux_head=True)
    logits = model(images)                          # (N, 150, H, W)
    logits, aux = model.forward_with_aux(images)    # training with the auxiliary FCN loss
    scores = predict_sliding(model.eval(), images, crop_size=512, stride=341)

See docs/segmentation.md.
"""

from .adapters import PlainPyramidAdapter
from .decoders import ConvHead, ConvNormAct, FCNHead, FPNHead, PyramidPoolingModule, UperNetHead
from .inference import predict_sliding, predict_whole
from .model import DECODERS, SegmentationModel, create_feature_backbone, create_segmentation_model

__all__ = [
    "DECODERS",
    "ConvHead",
    "ConvNormAct",
    "FCNHead",
    "FPNHead",
    "PlainPyramidAdapter",
    "PyramidPoolingModule",
    "SegmentationModel",
    "UperNetHead",
    "create_feature_backbone",
    "create_segmentation_model",
    "predict_sliding",
    "predict_whole",
]

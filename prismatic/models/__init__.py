from prismatic.models.configuration import CONFIGS, VLAConfig, get_config
from prismatic.models.loading import BaseModelConfig
from prismatic.models.modeling import MergeVLA, VLAOutput
from prismatic.models.pretrained import build_vla, from_pretrained, save_pretrained

__all__ = ["CONFIGS", "VLAConfig", "get_config", "BaseModelConfig", "MergeVLA", "VLAOutput", "build_vla",
           "from_pretrained", "save_pretrained"]

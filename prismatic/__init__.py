"""mergevla: MergeVLA (cross-skill model merging of vision-language-action experts), reimplemented."""

__version__ = "0.1.0"

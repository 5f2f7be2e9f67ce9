"""The label convention shared by data, compression, losses and training: transformers' ignored label."""

IGNORE_INDEX = -100  # labels equal to this are not supervised (torch's cross-entropy default `ignore_index`)

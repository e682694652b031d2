"""ctflow: generate 3D chest CT volumes from radiology reports.

A CT volume is treated as a video of axial slices: a slice autoencoder maps each
slice to a latent, a report encoder reads the text, and a flow-matching
transformer generates the latent volume one chunk of slices at a time.
"""

from ctflow.errors import CTFlowError, CTFlowWarning

__version__ = "0.1.0"
__all__ = ["CTFlowError", "CTFlowPipeline", "CTFlowWarning", "__version__"]


def __getattr__(name: str):
    # the pipeline imports torch; `import ctflow` (and the CLI's start) need not
    if name == "CTFlowPipeline":
        from ctflow.pipeline import CTFlowPipeline

        return CTFlowPipeline
    raise AttributeError(f"module 'ctflow' has no attribute {name!r}")

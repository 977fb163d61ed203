"""Models that ship with the package, so that the demo runs offline and without its slowest stage.

``PUBLIC_DIGITS_BASE``: the embedded demo's public base, a diffusers ``DPLDMPipeline`` folder (KL autoencoder,
class-conditional latent UNet, DDIM scheduler, the ten digit classes) trained on public data only, by the
commands in its ``README.md`` (``train_autoencoder.py`` + ``train_ldm.py`` on ``public-digits-8x8``); stored in
float16 (3.3 MB, no file over 2 MB), loaded as float32 like any diffusers folder. No private data, so no privacy
cost; ``examples/run_demo.py --retrain_base`` rebuilds it from the public digits (about 9 min on 2 CPU cores).
"""

from pathlib import Path

PUBLIC_DIGITS_BASE = Path(__file__).resolve().parent / "public-digits-base"

__all__ = ["PUBLIC_DIGITS_BASE"]

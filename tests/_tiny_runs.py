"""Old import path of the run helpers, kept while tests/test_init_from.py and
test_latent_cache_multiprocess.py import it; they live in tiny.py now (`two_process_command` is
the one way to start a 2-process run)."""

from tiny import make_captioned_folder, run
from tiny import tiny_autoencoder_dir as make_tiny_autoencoder_folder
from tiny import two_process_command as accelerate_cmd

__all__ = ["accelerate_cmd", "make_captioned_folder", "make_tiny_autoencoder_folder", "run"]

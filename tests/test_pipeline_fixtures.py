"""Old import path of the tiny stand-ins, kept while tests/test_generate.py, test_init_from.py,
test_lora.py and test_pipeline_stock.py import from it; they live in tiny.py now, the single-thread
fixture in conftest.py."""

from tiny import tiny_bert_dir, tiny_clip_dir, tiny_pipeline

__all__ = ["single_thread", "tiny_bert_dir", "tiny_clip_dir", "tiny_pipeline"]
single_thread = None  # the importers name it; conftest.py's autouse fixture of that name does the work

"""A fourth dataset that lives entirely outside finepose/ and workflow/ (tests/test_new_dataset.py).

``reader`` is its reader module (``reader: fourth_dataset.reader`` in a workflow config, with
this folder's parent on PYTHONPATH); ``reader.synthesize`` writes a small release in the
dataset's own text format. It is also the README's "Adding a dataset" example.
"""

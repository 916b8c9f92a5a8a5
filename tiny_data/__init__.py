"""Toy moving-shapes video data for the rf tutorial.

Everything lives in ``tiny_data.shapes``; import from there, e.g.

    from tiny_data.shapes import load_dataset, tokenize, TRAIN_PATH

(This file deliberately re-exports nothing, so that
``python -m tiny_data.shapes`` runs without a "found in sys.modules" warning.)
"""

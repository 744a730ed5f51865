"""Data toolkit: raw-text cleaning, indexed-dataset building, pretraining and SFT datasets."""

"""llmcal: measure and restore the calibration of preference-aligned language models."""
__version__ = "0.1.0"

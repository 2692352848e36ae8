"""The paper's experiments as tools: resolution sweep plots, robustness suites,
effective receptive fields, and a linear-probe example of feature extraction."""

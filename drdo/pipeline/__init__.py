"""Offline passes over a data set with a trained model: Oracle scoring, reference log-probs and
evaluation by generation."""

"""Training: TrainState, the pure train/eval steps, and the train_and_evaluate loop."""

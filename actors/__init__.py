"""Worker side of odpo: plain actor classes (generator, scorer, learner), losses, model loading."""

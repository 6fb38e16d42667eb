"""Commands that run many trainings: the quick study (the main job) and sweeps of configs x seeds."""

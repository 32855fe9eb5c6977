"""Training one cohort of students: the engine loop, a method's lifecycle, hooks, devices, recipes
and checkpoints."""

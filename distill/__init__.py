"""Knowledge distillation, the MobileNetV4 recipe: teacher-labelled, differently augmented datasets mixed by weight.

- `teacher`: the frozen teacher (an export or checkpoint of ours, or a timm name + local weights), kept out of the
  student's checkpoints and EMA copy;
- `recipe`: what `distill=true` adds to a run (sources, stream, objective, validation), from the `kd` config group;
- `views`: where a sample's pixels come from (drawn online, replayed from stored parameters, or stored pixels);
- `build` (`python -m distill.build`): labels the views once; `kdset`: their on-disk layout;
- `objectives`: soft-target distillation (the recipe) and classic logit KD; `validation`: the teacher's val metrics.

Its settings live in conf/kd/ (a `conf/distill/` folder would shadow the `distill=true` switch).
"""

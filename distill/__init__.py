"""Knowledge distillation, the MobileNetV4 recipe: teacher-labelled, differently augmented datasets mixed by weight.

    teacher     the frozen teacher (any network `train.nets.load` loads), kept out of checkpoints and the EMA copy
    sources     the kd sources (D1, D2, D3) and the teacher as the `kd` group configures them
    views       where a sample's pixels come from: drawn online, replayed from stored parameters, or stored pixels
    select      D3: score extra images with a selector, keep the confident ones, balance classes
    recipe      what `distill=true` adds to a run: the teacher-labelled data, the objective, validation beside it
    objectives  soft-target distillation (the recipe) and classic logit KD; `validation`: the teacher's val metrics
    build       `python -m distill.build`: label the views once; `render`: its workers and block writer
    kdset       a built set's on-disk layout; `identity`: what makes two builds the same; `reader`: open a set to train

Its settings live in conf/kd/ (a `conf/distill/` folder would shadow the `distill=true` switch).
"""

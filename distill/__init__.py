"""Knowledge distillation (the MobileNetV4 recipe): teacher-labelled, differently augmented datasets mixed by
weight. Its settings live in conf/kd/ (a `conf/distill/` folder would shadow the `distill=true` switch)."""

"""Applications built on the compiler (edgetune.compiler): what a user runs, not how a step
is built. Each imports `compile` and the Trainer; none is imported by the compiler.

    finetune.py  the training loop, evaluation, schedules, history and plots
    runs.py      resumable runs: a run folder's settings, checkpoints, --resume
    jobs.py      a fine-tuning job: model + data + preprocessing, shared by finetune/search/demo
    lm.py        language models: data, training, evaluation, generation
    peft.py      LoRA adapters saved in PEFT's format, or folded into the weights
    lisa.py      LISA: sampled blocks + embedding and head trained a period at a time, a compile a period
    search.py    the Tiny Training Engine's scheme search under a memory budget
    measure.py   the measured peak memory of a step (edgetune's or PyTorch's), in a fresh process
    baseline.py  the same job in plain PyTorch, to compare against
    demo.py      `edgetune demo`

The command line (edgetune.cli) sits on top of these; a new command is a function there that
calls into an application here.
"""

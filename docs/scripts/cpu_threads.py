"""ms per sampling step (16 DDIM steps, compiled step engine) of a run's one-pass student and two-pass
teacher at batch 1, 16, 64 and 256, with MindSpore's CPU kernel threads set to N (or its default).
MindSpore takes the thread count once per process, so run one process per setting (docs/sampling.md):

    python docs/scripts/cpu_threads.py outputs/digits default
    python docs/scripts/cpu_threads.py outputs/digits 1
"""
import sys

from run_timing import ms_per_step, open_run, run_nets, sampler_call, student_predictor, teacher_predictor, warm


def main(run: str, threads: str) -> None:
    cfg, data, settings = open_run(run, threads)
    student, teacher = run_nets(cfg, data)
    predictors = {"student": student_predictor(student), "teacher": teacher_predictor(teacher)}
    for batch in (1, 16, 64, 256):
        calls = {k: sampler_call(p, batch, data, settings) for k, p in predictors.items()}
        warm(calls, 3)  # compile and warm
        ms = ms_per_step(calls, 7 if batch < 256 else 3, settings.num_steps)
        print(f"threads {threads} batch {batch}: student {ms['student']:.2f} ms/step, teacher {ms['teacher']:.2f} "
              f"ms/step, one pass vs two {ms['teacher'] / ms['student']:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits", sys.argv[2] if len(sys.argv) > 2 else "default")

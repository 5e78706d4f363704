"""How far one pass can beat two at a batch size: the one-pass student's own time per 16-step sampler call at
batch B and 2B, beside the two-pass teacher's at B (which runs the same network on 2B images in one call). The
one-pass over two-pass ratio at batch B cannot exceed the student's time at 2B over its time at B, whatever
the sampler does around the network (docs/sampling.md). One process per thread setting:

    python docs/scripts/batch_scaling.py outputs/digits default
    python docs/scripts/batch_scaling.py outputs/digits 1
"""
import sys

from run_timing import ms_per_step, open_run, run_nets, sampler_call, student_predictor, teacher_predictor, warm

BATCHES = (16, 64)


def main(run: str, threads: str, repeats: int = 11) -> None:
    cfg, data, settings = open_run(run, threads)
    student, teacher = run_nets(cfg, data)
    student_step, teacher_step = student_predictor(student), teacher_predictor(teacher)
    calls = {}
    for b in BATCHES:
        calls[f"student_b{b}"] = sampler_call(student_step, b, data, settings)
        calls[f"student_b{2 * b}"] = sampler_call(student_step, 2 * b, data, settings)
        calls[f"teacher_b{b}"] = sampler_call(teacher_step, b, data, settings)
    warm(calls, 2)  # compile and warm
    ms = ms_per_step(calls, repeats, settings.num_steps)
    for b in BATCHES:
        print(f"threads {threads} batch {b}: student {ms[f'student_b{b}']:.2f} ms/step, at batch {2 * b} "
              f"{ms[f'student_b{2 * b}']:.2f}, teacher {ms[f'teacher_b{b}']:.2f}; one pass vs two "
              f"{ms[f'teacher_b{b}'] / ms[f'student_b{b}']:.2f}x, ceiling (student {2 * b} / {b}) "
              f"{ms[f'student_b{2 * b}'] / ms[f'student_b{b}']:.2f}x", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/digits", sys.argv[2] if len(sys.argv) > 2 else "default")

"""Which images an optimizer step sees (--batching epoch | uniform) and what its gradient is, on the tiny SDXL.

epoch (the authors' schedule): shuffled passes over the photos without replacement, a step after every grad_accum
photos and at the end of every pass, the loss always / grad_accum. uniform: grad_accum photos with replacement.
"""
import signal

import pytest
import torch

import train_dreambooth
from conftest import adapter_tensors, run_folder, tensors_equal, tiny_argv


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: see conftest.single_thread


def plans(batching, n_images, steps, grad_accum=4, n_class_images=0, seed=0):
    generator, passes = torch.Generator().manual_seed(seed), train_dreambooth.new_passes()
    return [train_dreambooth.plan_step(batching, passes, n_images, n_class_images, grad_accum, generator)
            for _ in range(steps)]


@pytest.mark.parametrize("n_images, sizes", [(4, [4, 4, 4]), (5, [4, 1, 4, 1, 4, 1]), (6, [4, 2, 4, 2, 4, 2])])
def test_epoch_steps_are_grad_accum_photos_or_the_rest_of_a_pass(n_images, sizes):
    steps = plans("epoch", n_images, len(sizes))
    assert [len(plan) for plan in steps] == sizes
    photos = [photo for plan in steps for photo, _, _ in plan]
    passes = [photos[i:i + n_images] for i in range(0, len(photos), n_images)]
    assert len(passes) == 3 and all(sorted(p) == list(range(n_images)) for p in passes)  # no repeat within a pass
    assert len({tuple(p) for p in passes}) > 1  # each pass is shuffled anew
    seeds = [seed for plan in steps for _, _, seed in plan]
    assert len(set(seeds)) == len(seeds)  # every micro-batch its own noise and timestep
    assert all(class_image is None for plan in steps for _, class_image, _ in plan)


def test_uniform_steps_draw_grad_accum_photos_with_replacement():
    steps = plans("uniform", 5, 50)
    assert all(len(plan) == 4 for plan in steps)
    photos = [[photo for photo, _, _ in plan] for plan in steps]
    assert {p for step in photos for p in step} == set(range(5))
    assert any(len(set(step)) < 4 for step in photos)  # with replacement: some step sees a photo twice


def test_prior_preservation_pairs_each_micro_batch_with_one_class_image():
    # epoch: the class images come in their own shuffled passes, one per instance micro-batch, across step boundaries
    class_images = [c for plan in plans("epoch", 5, 12, n_class_images=7) for _, c, _ in plan]
    assert len(class_images) == 6 * 5 and all(sorted(class_images[i:i + 7]) == list(range(7)) for i in (0, 7, 14))
    uniform = [c for plan in plans("uniform", 5, 10, n_class_images=7) for _, c, _ in plan]
    assert len(uniform) == 40 and set(uniform) <= set(range(7))
    assert plans("epoch", 5, 4, n_class_images=7, seed=3) == plans("epoch", 5, 4, n_class_images=7, seed=3)


def test_accumulated_gradient_is_the_gradient_of_the_summed_losses_over_grad_accum(dreambooth_dir, tmp_path,
                                                                                  monkeypatch):
    # The real loop, 5 photos, grad_accum 4: steps of 4, then 1 micro-batch. At each optimizer step the adapter's
    # gradient must equal d/dtheta (sum of the step's micro-batch losses) / 4, recomputed here from the same inputs.
    # loss.csv logs each step's mean over the micro-batches it saw (a short step of 1: that one loss, not / 4).
    diffusion_losses, clip = train_dreambooth.diffusion_losses, torch.nn.utils.clip_grad_norm_
    micro_batches, plan_sizes, checked, losses = [], [], [], []

    def record_losses(unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator, autocast):
        micro_batches.append((unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator.get_state(),
                              autocast))
        result = diffusion_losses(unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator, autocast)
        losses.append(float(result[0]))
        return result

    def check_gradient(params, *args, **kwargs):
        params = list(params)
        total = 0
        for unet, scheduler, latents, prompt_embeds, pooled, time_ids, state, autocast in micro_batches:
            generator = torch.Generator()
            generator.set_state(state)
            total = total + diffusion_losses(unet, scheduler, latents, prompt_embeds, pooled, time_ids, generator,
                                             autocast)[0]
        expected = torch.autograd.grad(total / 4, params)
        error = max(float((p.grad - g).abs().max()) for p, g in zip(params, expected))
        scale = max(float(g.abs().max()) for g in expected)
        checked.append((len(micro_batches), error / scale))
        micro_batches.clear()
        return clip(params, *args, **kwargs)

    plan_step = train_dreambooth.plan_step
    monkeypatch.setattr(train_dreambooth, "plan_step", lambda *args: _recorded(plan_step, plan_sizes, *args))
    monkeypatch.setattr(train_dreambooth, "diffusion_losses", record_losses)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", check_gradient)
    run_dir = train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path, "--k", "500", "--steps", "2", "--grad-accum", "4"))
    assert plan_sizes == [4, 1]
    assert [count for count, _ in checked] == [4, 1]
    assert all(relative < 1e-5 for _, relative in checked), checked
    logged = [float(row.split(",")[1]) for row in (run_dir / "loss.csv").read_text().splitlines()[1:]]
    assert logged == pytest.approx([sum(losses[:4]) / 4, losses[4]], abs=2e-6)  # loss.csv keeps 6 decimals


def _recorded(plan_step, sizes, *args):
    plan = plan_step(*args)
    sizes.append(len(plan))
    return plan


@pytest.mark.parametrize("batching", ["epoch", "uniform"])
def test_resume_in_the_middle_of_a_pass_is_bit_exact(dreambooth_dir, tmp_path, monkeypatch, batching):
    # 5 photos, grad_accum 2: passes of 2, 2, 1 photos. Cut after step 1 (2 photos into a pass), resume to step 4
    # (finishing that pass and starting the next): the same adapter and losses as without the cut, bit for bit.
    argv = ["--k", "500", "--steps", "4", "--grad-accum", "2", "--batching", batching]
    full = run_folder(train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path / "full", *argv)).parent)

    clip = torch.nn.utils.clip_grad_norm_

    def clip_then_interrupt(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C during step 1: the step finishes, is checkpointed, exit 130
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupt)
    with pytest.raises(SystemExit):
        train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path / "cut", *argv))
    monkeypatch.undo()
    cut = run_folder(tmp_path / "cut", "checkpoint.pt")
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    if batching == "epoch":
        assert state["passes"]["instance"]["position"] == 2 and len(state["passes"]["instance"]["order"]) == 5

    train_dreambooth.main(tiny_argv(dreambooth_dir, tmp_path / "cut", *argv, "--resume"))
    assert tensors_equal(adapter_tensors(full), adapter_tensors(cut))
    assert (full / "loss.csv").read_text() == (cut / "loss.csv").read_text()

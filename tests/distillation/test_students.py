"""A layer-dropped student computes exactly its teacher with the other blocks skipped, caches included."""

import pytest
import torch

from effref.distillation.students import every_kth, layer_dropped_student
from effref.models.llama import Llama, LlamaConfig


def teacher(tie=True):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=40, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64,
                             max_seq_len=32, tie_embeddings=tie)).eval()


def skipping(model, ids, keep):
    """The teacher's forward pass with only the blocks in `keep`, written out."""
    cos, sin = model.rope_cos[:ids.shape[1]], model.rope_sin[:ids.shape[1]]
    x = model.embed(ids)
    for i in keep:
        x = model.blocks[i](x, cos, sin)
    return model.lm_head(model.norm(x))


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("keep", [[0, 2, 4], [3], [0, 1, 2, 3, 4]])
def test_student_equals_the_teacher_with_blocks_skipped(keep, tie):
    big = teacher(tie)
    ids = torch.randint(0, 40, (2, 9))
    student = layer_dropped_student(big, keep)
    assert student.cfg.n_layers == len(keep)
    torch.testing.assert_close(student(ids), skipping(big, ids, keep), rtol=0, atol=0)


@torch.no_grad()
def test_cached_generation_uses_the_students_own_slots():
    big = teacher()
    student = layer_dropped_student(big, [1, 4])
    ids = torch.randint(0, 40, (1, 6))
    full = student.generate(ids, 5)
    step_by_step = ids
    for _ in range(5):
        step_by_step = torch.cat([step_by_step, student(step_by_step)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(full, step_by_step)


def test_the_student_is_a_copy_training_it_leaves_the_teacher_alone():
    big = teacher()
    before = {k: v.clone() for k, v in big.state_dict().items()}
    student = layer_dropped_student(big, [0, 4])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in before.items())


def test_every_kth_spreads_the_blocks_and_keeps_both_ends():
    assert every_kth(30, 6) == [0, 6, 12, 17, 23, 29]
    assert every_kth(5, 5) == [0, 1, 2, 3, 4] and every_kth(5, 1) == [4]


@pytest.mark.parametrize("keep", [[], [0, 0], [2, 1], [5], [-1]])
def test_bad_keep_lists_are_refused(keep):
    with pytest.raises(ValueError, match="keep"):
        layer_dropped_student(teacher(), keep)


def test_non_llama_teachers_are_refused():
    with pytest.raises(TypeError, match="Llama.from_hf"):
        layer_dropped_student(torch.nn.Linear(2, 2), [0])
    with pytest.raises(ValueError, match="n_keep"):
        every_kth(4, 5)

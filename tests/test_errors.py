import pytest

from ctflow.errors import CTFlowError, one_of


@pytest.mark.parametrize(
    ("names", "spelled"),
    [
        (("full",), "'full'"),
        (("full", "factorized"), "'full' or 'factorized'"),
        (("velocity", "sample", "skip"), "'velocity', 'sample' or 'skip'"),
        ({"euler": 1, "heun": 2}, "'euler' or 'heun'"),  # a mapping's keys, in order
    ],
)
def test_one_of_spells_the_choices(names, spelled):
    assert one_of(names) == spelled


def test_messages_are_one_line():
    err = CTFlowError("first line\n  second   line")
    assert str(err) == "first line second line"


def _refusals():
    """Each check that names its allowed values, and the constant it spells them from."""
    from ctflow.data.phantom import EFFUSION_SIDES, FINDING_TYPES, LOBES, PhantomSpec, clear_twin
    from ctflow.eval.features import PLANES, plane_slices
    from ctflow.models.discriminator import NORMS, PatchDiscriminator
    from ctflow.models.transformer import TRANSFORMER_PRESETS, preset_config
    from ctflow.models.vae import VAE_PRESETS, build_vae
    from ctflow.train.vae_loss import DISC_LOSSES, AVAELoss

    def spec(finding):
        return lambda: PhantomSpec(seed=1, findings=[finding]).validate()

    return [
        ("disc_loss", lambda: AVAELoss(disc_loss="wasserstein"), DISC_LOSSES),
        ("vae preset", lambda: build_vae("huge"), VAE_PRESETS),
        ("transformer preset", lambda: preset_config("huge"), TRANSFORMER_PRESETS),
        ("discriminator norm", lambda: PatchDiscriminator(norm="layer"), NORMS),
        ("finding type", spec({"type": "mass"}), FINDING_TYPES),
        ("lobe", spec({"type": "nodule", "lobe": "lingula"}), LOBES),
        ("effusion side", spec({"type": "effusion", "side": "both"}), EFFUSION_SIDES),
        ("clear twin", lambda: clear_twin(PhantomSpec(seed=1), "mass"), FINDING_TYPES),
        ("plane", lambda: plane_slices(None, "oblique"), PLANES),
    ]


@pytest.mark.parametrize(("what", "refuse", "allowed"), _refusals(), ids=[r[0] for r in _refusals()])
def test_refusals_name_the_choices_in_one_style(what, refuse, allowed):
    with pytest.raises(CTFlowError) as err:
        refuse()
    assert one_of(allowed) in str(err.value), what
    assert "one of" not in str(err.value)

"""Text-to-image DP-LoRA on SDXL bases, as a user meets it: a base folder in the layout
``StableDiffusionXLPipeline.save_pretrained`` writes (two tiny CLIP text encoders and tokenizers built locally, a
``text_time`` UNet, a VAE with per-channel latent statistics), private captioned images of several sizes trained
through train_dp_lora.py, the adapter loaded the standard diffusers way."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from helpers import (
    SDXL_CONTEXT_DIM,
    TEXT_DIM,
    TEXT_LENGTH,
    TextRuns,
    caption_folder,
    digit_folder,
    fixed_loss,
    lora_denoiser,
    oriented_photo_folder,
    private,
    save_sdxl_base,
    train,
)
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from torch.utils.data import TensorDataset

from dp_diffusers import DiffusionLoss, DPLDMPipeline, NoisePrediction
from dp_diffusers.constants import ADAPTER_CONFIG_NAME, DP_REPORT_NAME, LORA_WEIGHT_NAME, SAMPLES_NAME
from dp_diffusers.data import DataError, decode_latents, encode_latents, load_image_dataset
from dp_diffusers.families import PrivateExamples, StableDiffusionXLFamily, UnsupportedBaseError
from dp_diffusers.families.stable_diffusion_xl import center_crop_time_ids
from dp_diffusers.privacy import private_backward

pytestmark = pytest.mark.usefixtures("one_thread")

#: (height, width) of the private images: portrait, landscape, square, each resized and center-cropped to 16
SIZES = [(24, 16), (16, 40), (16, 16), (33, 21)]
SDXL = TextRuns(batch_size=8, steps=3, guidance_scale=4.0, secret="quixoticzephyr", sizes=tuple(SIZES))


def test_sdxl_base_samples_as_diffusers_stable_diffusion_xl_pipeline(tiny_sdxl_base):
    pipe = SDXL.assert_samples_as(StableDiffusionXLPipeline, tiny_sdxl_base)
    assert pipe.base_family == "stable-diffusion-xl"


def test_sdxl_adapter_is_the_standard_lora_and_no_caption_is_written(tiny_sdxl_base, tmp_path):
    """2 DP steps on captioned images of several sizes; the adapter is StableDiffusionXLPipeline's own LoRA (its
    config, a non-default alpha included, in the file's metadata): load_lora_weights gives exactly the images of
    DPLDMPipeline.from_pretrained(adapter), and they differ from the base's."""
    out = tmp_path / "adapter"
    flags = {"--samples_per_class": 1, "--lora_alpha": 4, "--validation_prompt": SDXL.prompts[0]}
    train(SDXL.args(tiny_sdxl_base, out, SDXL.captioned(tmp_path / "data", 24), **flags))
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and report["dataset_size"] == 24 and report["lora_alpha"] == 4
    assert any(name.endswith("attn2.to_k") for name in report["adapted_modules"])
    config = json.loads((out / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_family"] == "stable-diffusion-xl" and (out / SAMPLES_NAME).is_file()
    with safe_open(out / LORA_WEIGHT_NAME, "pt") as weights:
        assert all(key.startswith("unet.") for key in weights.keys())
        assert json.loads(weights.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 4

    standard = SDXL.assert_standard_adapter(StableDiffusionXLPipeline, tiny_sdxl_base, out)
    assert standard.unet.peft_config["default_0"].lora_alpha == 4
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-to-image" and "StableDiffusionXLPipeline.from_pretrained" in card.text


def test_sdxl_trains_on_labelled_images_captioned_from_a_template(tiny_sdxl_base, tmp_path):
    out = tmp_path / "adapter"
    data = digit_folder(tmp_path / "digits", ["cat", "dog"], per_class=6)  # grayscale: converted to RGB
    train(SDXL.args(tiny_sdxl_base, out, data, **{"--caption_template": "a photo of a {label}", "--random_flip": True,
                                             "--noise_multiplicity": 2}))  # fmt: skip
    report = json.loads((out / DP_REPORT_NAME).read_text())
    assert report["steps"] == 2 and report["random_flip"] and report["noise_multiplicity"] == 2
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["caption_template"] == "a photo of a {label}"


def test_time_ids_are_each_image_s_own_as_diffusers_sdxl_scripts_compute_them(tiny_sdxl_base, tmp_path):
    """original_size (before the resize), crop_top_left (after the resize, center crop), target_size: what
    diffusers' train_text_to_image_lora_sdxl.py computes per image with torchvision's Resize and CenterCrop."""
    from torchvision import transforms

    sizes = [(24, 16), (16, 40), (16, 16), (33, 21), (17, 99)]
    resolution = 16
    expected = []
    for height, width in sizes:
        image = transforms.Resize(resolution)(Image.new("RGB", (width, height)))
        top = max(0, int(round((image.height - resolution) / 2.0)))
        left = max(0, int(round((image.width - resolution) / 2.0)))
        expected.append([height, width, top, left, resolution, resolution])
    torch.testing.assert_close(center_crop_time_ids(torch.tensor(sizes), resolution), torch.tensor(expected).float())

    pipe = DPLDMPipeline.from_pretrained(tiny_sdxl_base)
    data = load_image_dataset(train_data_dir=str(caption_folder(tmp_path / "d", ["a", "b", "c", "d"], sizes=SIZES)))
    examples = PrivateExamples(data, "image", resolution, captions=list(data["text"]))
    StableDiffusionXLFamily.add_canaries(examples, torch.zeros(2, 3, 16, 16), torch.zeros(2), ["x y", "z w"])
    conditions = StableDiffusionXLFamily.encode_conditions(pipe, examples)
    assert conditions["encoder_hidden_states"].shape == (6, TEXT_LENGTH, SDXL_CONTEXT_DIM)
    assert conditions["text_embeds"].shape == (6, TEXT_DIM)
    stored = [Image.open(path).size[::-1] for path in sorted((tmp_path / "d").glob("*.png"))]
    order = [stored.index(tuple(size)) for size in ([r[0], r[1]] for r in conditions["time_ids"][:4].long().tolist())]
    assert sorted(order) == [0, 1, 2, 3]  # each image's own size
    assert conditions["time_ids"][4:].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # canaries: drawn square

    # the pipeline's own encode_prompt gives the captions' context and pooled embedding
    view = pipe.family.sampling_pipeline(pipe)
    context, _, pooled, _ = view.encode_prompt(["a", "b"], device="cpu", do_classifier_free_guidance=False)
    ordered = StableDiffusionXLFamily.encode_prompts(pipe, ["a", "b"])
    torch.testing.assert_close(ordered["encoder_hidden_states"], context)
    torch.testing.assert_close(ordered["text_embeds"], pooled)


def test_time_ids_of_exif_rotated_photos_are_the_decoded_image_s_without_decoding_it(tiny_sdxl_base, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """A phone photo stored landscape with EXIF orientation 6 is portrait once decoded (datasets applies
    exif_transpose): its time ids (original size, crop offset) are those diffusers' SDXL script computes from the
    decoded image, for every orientation, in JPEG and PNG (an eXIf chunk before or after the image data), read from
    the files' headers without decoding a pixel."""
    import PIL.ImageFile
    from torchvision import transforms

    photos = [("jpeg", 6, (16, 40)), ("jpeg", 8, (24, 17)), ("jpeg", 5, (16, 30)), ("jpeg", 7, (33, 21)),
              ("jpeg", 3, (16, 40)), ("jpeg", 1, (33, 21)), ("png", 6, (16, 24)), ("png-trailing", 8, (16, 24))]
    data = load_image_dataset(train_data_dir=str(oriented_photo_folder(tmp_path / "photos", photos)))
    resolution = 16
    expected = []
    for image in data["image"]:  # decoded by datasets, as the script receives it
        resized = transforms.Resize(resolution)(image)
        top = max(0, int(round((resized.height - resolution) / 2.0)))
        left = max(0, int(round((resized.width - resolution) / 2.0)))
        expected.append([image.height, image.width, top, left, resolution, resolution])
    assert expected[0][:4] == [40, 16, 12, 0]  # stored 16 x 40 landscape: portrait, cropped top and bottom
    upright = [list(size[::-1]) if orientation in (5, 6, 7, 8) else list(size) for _, orientation, size in photos]
    assert [row[:2] for row in expected] == upright  # orientations 5-8 are decoded with height and width swapped

    pipe = DPLDMPipeline.from_pretrained(tiny_sdxl_base)
    examples = PrivateExamples(data, "image", resolution, captions=list(data["text"]))

    def no_decoding(image):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    time_ids = StableDiffusionXLFamily.image_conditions(pipe, examples)["time_ids"]
    torch.testing.assert_close(time_ids, torch.tensor(expected).float())


def test_null_condition_is_the_pipeline_s_unconditional_half(tiny_sdxl_base, tmp_path):
    """force_zeros_for_empty_prompt (SDXL's setting): zeros, as the pipeline's negative embeddings; otherwise the
    empty prompt's encoding. Time ids are never dropped."""
    pipe = DPLDMPipeline.from_pretrained(tiny_sdxl_base)
    null = StableDiffusionXLFamily.null_condition(pipe)
    assert set(null) == {"encoder_hidden_states", "text_embeds"}
    assert all(not value.any() for value in null.values())
    other = DPLDMPipeline.from_pretrained(save_sdxl_base(tmp_path / "no-zeros", force_zeros_for_empty_prompt=False))
    view = other.family.sampling_pipeline(other)
    _, negative, _, negative_pooled = view.encode_prompt("a", device="cpu", do_classifier_free_guidance=True)
    null = StableDiffusionXLFamily.null_condition(other)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)
    torch.testing.assert_close(null["text_embeds"], negative_pooled)


def test_caption_dropout_is_a_per_row_draw_inside_the_loss(tiny_sdxl_base):
    """Each row (each noise-multiplicity copy too) drops to the null context and pooled embedding on its own; its
    time ids stay its own."""
    seen = []

    def model(noisy, timesteps, conditions):
        seen.append(conditions)
        return torch.zeros_like(noisy)

    from diffusers import DDPMScheduler

    pipe = DPLDMPipeline.from_pretrained(tiny_sdxl_base)
    null = StableDiffusionXLFamily.null_condition(pipe)
    rows = 400
    conditions = {"encoder_hidden_states": torch.randn(rows, TEXT_LENGTH, SDXL_CONTEXT_DIM) + 5,
                  "text_embeds": torch.randn(rows, TEXT_DIM) + 5, "time_ids": torch.rand(rows, 6) + 1}  # fmt: skip
    loss = DiffusionLoss(NoisePrediction(DDPMScheduler()), tuple(conditions), null_condition=null, dropout=0.25)
    loss(model, torch.randn(rows, 4, 8, 8), *conditions.values())
    dropped = (seen[0]["encoder_hidden_states"] == 0).flatten(1).all(1)
    kept = (seen[0]["encoder_hidden_states"] == conditions["encoder_hidden_states"]).flatten(1).all(1)
    assert bool((dropped ^ kept).all()) and 70 < int(dropped.sum()) < 130
    assert torch.equal((seen[0]["text_embeds"] == 0).all(1), dropped)  # context and pooled drop together
    assert torch.equal(seen[0]["time_ids"], conditions["time_ids"])


@pytest.mark.parametrize("k", [1, 3])
def test_one_enormous_sdxl_example_moves_the_adapter_by_exactly_lr_c_over_b(k):
    """Sensitivity: an example whose latents, context, pooled embedding and time ids are all enormous moves the
    update by exactly lr * C / B (noise off), its k copies averaged before the one clip."""
    torch.manual_seed(0)
    model = lora_denoiser("sdxl", "attention")
    names = ("encoder_hidden_states", "text_embeds", "time_ids")
    data = TensorDataset(torch.randn(64, 4, 8, 8), torch.randn(64, TEXT_LENGTH, SDXL_CONTEXT_DIM),
                         torch.randn(64, TEXT_DIM), torch.rand(64, 6))  # fmt: skip
    lr, clip = 0.5, 1e-7
    dp, _ = private(model, data, sigma=0.0, clip=clip, batch=8, k=k, lr=lr, planned_steps=10)
    _, loss_fn = fixed_loss(torch.randint(0, 1000, (k,)), torch.randn(k, 4, 8, 8), names)
    private_backward(dp.model, dp.optimizer, loss_fn, torch.randn(1, 4, 8, 8) * 1e4,
                     torch.randn(1, TEXT_LENGTH, SDXL_CONTEXT_DIM) * 1e4, torch.randn(1, TEXT_DIM) * 1e4,
                     torch.rand(1, 6) * 1e4)  # fmt: skip
    dp.optimizer.step()
    moved = lr * torch.sqrt(sum((p.grad.double() ** 2).sum() for p in dp.optimizer.params))
    bound = lr * clip / dp.optimizer.expected_batch_size
    assert bound * 0.99 <= moved <= bound * (1 + 1e-4)


def test_latents_use_the_vae_s_own_statistics(tiny_sdxl_base):
    """SDXL-style VAE configs carry per-channel latents_mean / latents_std: latents are
    (z - mean) * scaling_factor / std, as diffusers' SDXL scripts encode and its pipeline decodes."""
    vae = DPLDMPipeline.from_pretrained(tiny_sdxl_base).vae
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        latents = encode_latents(vae, pixels)
        torch.testing.assert_close(latents, (z - mean) * vae.config.scaling_factor / std)
        torch.testing.assert_close(decode_latents(vae, latents), vae.decode(z).sample, rtol=1e-4, atol=1e-5)


def test_bad_sdxl_inputs_fail_before_anything_is_written(tiny_sdxl_base, tmp_path):
    data = SDXL.captioned(tmp_path / "data", 12)
    labelled = digit_folder(tmp_path / "labelled", ["cat", "dog"])
    no_second_encoder = save_sdxl_base(tmp_path / "no-te2", without=("text_encoder_2",))
    no_second_tokenizer = save_sdxl_base(tmp_path / "no-tok2", without=("tokenizer_2",))
    cases = [
        (no_second_encoder, data, {}, UnsupportedBaseError, "without \\['text_encoder_2'\\]"),
        (no_second_tokenizer, data, {}, UnsupportedBaseError, "without \\['tokenizer_2'\\]"),
        (tiny_sdxl_base, data, {"--train_class_embedding": True}, DataError, "no class embedding to train"),
        (tiny_sdxl_base, labelled, {}, DataError, "needs captions.*--caption_template"),
        (tiny_sdxl_base, data, {"--resolution": 12}, DataError, "multiples of 8"),
        (tiny_sdxl_base, data, {"--resolution": 15}, DataError, "not divisible"),
        (tiny_sdxl_base, data, {"--central_image_noise_multiplier": 2.0}, DataError, "no classes to average over"),
        (tiny_sdxl_base, data, {"--pretrained_vae_model_name_or_path": tmp_path / "nowhere"}, OSError, "nowhere"),
    ]
    for i, (base, folder, flags, error, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(error, match=message):
            train(SDXL.args(base, out, folder, **{"--batch_size": 4, **flags}))
        assert not out.exists() or not any(out.iterdir())


def test_a_half_precision_safe_vae_encodes_in_the_mixed_precision(tiny_sdxl_base, tmp_path, monkeypatch):
    """--pretrained_vae_model_name_or_path (diffusers' flag): that autoencoder encodes, in --mixed_precision; without
    it the base's encodes in fp32 (SDXL's overflows in fp16)."""
    from dp_diffusers.data import encoding

    DPLDMPipeline.from_pretrained(tiny_sdxl_base).vae.save_pretrained(tmp_path / "vae-fix")
    dtypes = []
    real = encoding._unscaled_latents
    monkeypatch.setattr(encoding, "_unscaled_latents",
                        lambda vae, *a, **kw: dtypes.append(vae.dtype) or real(vae, *a, **kw))  # fmt: skip
    data = SDXL.captioned(tmp_path / "data", 8)
    fix = {"--mixed_precision": "bf16", "--batch_size": 4, "--cache_dir": tmp_path / "cache",
           "--pretrained_vae_model_name_or_path": tmp_path / "vae-fix"}
    train(SDXL.args(tiny_sdxl_base, tmp_path / "a", data, **fix))
    assert set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    train(SDXL.args(tiny_sdxl_base, tmp_path / "b", data, **{"--mixed_precision": "bf16", "--batch_size": 4}))
    assert set(dtypes) == {torch.float32}

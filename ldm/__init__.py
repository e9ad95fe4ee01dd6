"""Stage 3: the text-conditioned latent UNet, its training objective, sampling and the composed pipeline.

Modules (imported explicitly; this package file stays light so ``ldm.cli`` loads fast):
    ldm.unet          UNetConfig, UNET_PRESETS (tiny/small/sd15), build_unet, unet_denoiser
    ldm.objective     NoiseScheduleConfig, DiffusionConfig (+ presets), DiffusionObjective.loss
    ldm.conditioning  dropout_mask / apply_dropout (drop_captions): the one place captions are dropped for CFG
    ldm.guidance      classifier_free_guidance: CFG as a wrapper around the denoiser call
    ldm.samplers      SAMPLERS registry, build_sampler, denoise_latents
    ldm.pipeline      LatentDiffusionPipeline (from_parts / from_pretrained / save_pretrained / __call__)
    ldm.generate      the ldm-generate command
"""

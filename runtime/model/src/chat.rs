//! Chat prompts: the model's own Jinja chat template (GGUF `tokenizer.chat_template`,
//! or a Hugging Face folder's `tokenizer_config.json` / `chat_template.jinja`) rendered
//! with `minijinja` the way Hugging Face renders it (trim_blocks, lstrip_blocks,
//! Python string methods, `raise_exception`), ChatML where the model has none.

use crate::{Error, Result};
use serde::Serialize;

/// ChatML, for models without a template of their own.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The instructions a template may run in one render.
pub const TEMPLATE_FUEL: u64 = 1 << 24;

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: &str) -> Message {
        Message {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A chat template and the special-token strings templates refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from ("GGUF metadata", a file, "ChatML fallback").
    pub origin: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, origin: impl Into<String>, bos: String, eos: String) -> Self {
        ChatTemplate {
            source,
            origin: origin.into(),
            bos_token: bos,
            eos_token: eos,
        }
    }

    /// The conversation as the prompt text, with the generation prompt (the start of the
    /// assistant's turn) when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template that loops without end (or nearly) runs out of fuel and fails
        // instead of hanging; real templates use a few thousand units per message.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String {
            // Templates print today's date with it; a fixed date keeps prompts
            // reproducible.
            "01 Jan 2026".to_string()
        });
        let err = |e: minijinja::Error| {
            Error::Template(format!("chat template ({}): {e:#}", self.origin))
        };
        env.add_template("chat", &self.source).map_err(err)?;
        let tmpl = env.get_template("chat").map_err(err)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(err)
    }
}

//! Chat templates: the GGUF's own Jinja template rendered exactly (minijinja, with the
//! Python string methods Hugging Face templates use), or, when the GGUF carries none, a
//! template chosen by architecture.

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// Who said a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The human side.
    User,
    /// The model's earlier answers.
    Assistant,
    /// A tool's result handed back to the model.
    Tool,
}

/// One chat message as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// The text.
    pub content: String,
}

/// Where a model's template came from; logged at load and shown by `/api/show` later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSource {
    /// `tokenizer.chat_template` in the GGUF.
    Gguf,
    /// The GGUF has none; chosen by `general.architecture`.
    Architecture(&'static str),
    /// Neither: ChatML, the most common format, as llama.cpp also assumes.
    DefaultChatml,
}

/// Gemma's turn format. Gemma has no system role: a system message is folded into the
/// first user turn, separated by a blank line.
const GEMMA: &str = r#"{{- bos_token -}}
{%- set ns = namespace(prefix='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}
    {%- set ns.prefix = ns.prefix ~ m.content ~ '\n\n' -%}
  {%- else -%}
    <start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}
{{ (ns.prefix ~ m.content) | trim }}<end_of_turn>
{% set ns.prefix = '' -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{% endif -%}"#;

/// ChatML (`<|im_start|>role ... <|im_end|>`).
const CHATML: &str = r#"{%- for m in messages -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}"#;

/// A compiled chat template plus the special-token texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    handles_tools: bool,
    source: TemplateSource,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Picks the fallback for a GGUF without a template (also what `/api/show` prints for it).
pub fn fallback_for(architecture: &str) -> (TemplateSource, &'static str) {
    if architecture.starts_with("gemma") {
        (TemplateSource::Architecture("gemma"), GEMMA)
    } else {
        (TemplateSource::DefaultChatml, CHATML)
    }
}

impl ChatTemplate {
    /// Compiles the GGUF's template, or the architecture's fallback when `gguf` is `None`.
    pub fn new(
        gguf: Option<String>,
        architecture: &str,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, minijinja::Error> {
        let (source, text) = match gguf {
            Some(t) => (TemplateSource::Gguf, t),
            None => {
                let (source, text) = fallback_for(architecture);
                (source, text.to_owned())
            }
        };
        let mut env = Environment::new();
        // Hugging Face renders with these Jinja settings; templates are written for them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            chrono::Local::now().format(&fmt).to_string()
        });
        env.add_template_owned("chat", text)?;
        // Templates written for tool calling read a `tools` variable; the parser knows which
        // names a template reads, so a comment or a string mentioning tools does not count.
        let handles_tools = env
            .get_template("chat")?
            .undeclared_variables(false)
            .contains("tools");
        Ok(Self {
            handles_tools,
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// Text of the BOS token, so callers can tell whether a rendered prompt already has it.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// Whether the template renders tool definitions itself (its `tools` variable).
    pub fn handles_tools(&self) -> bool {
        self.handles_tools
    }

    /// Renders a conversation, with the tools offered to it (for templates that handle
    /// them), ending with the assistant's turn header when `add_generation_prompt` is set.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, minijinja::Error> {
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools.map(minijinja::Value::from_serialize),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    /// SmolLM2's template as shipped in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn gguf_template_renders_exactly_including_its_default_system_prompt() {
        let t = ChatTemplate::new(
            Some(SMOLLM2.into()),
            "llama",
            "<|im_start|>".into(),
            "<|im_end|>".into(),
        )
        .unwrap();
        let out = t.render(&[msg(Role::User, "Hi")], None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_without_template_falls_back_and_folds_the_system_prompt() {
        let t = ChatTemplate::new(None, "gemma3", "<bos>".into(), "<eos>".into()).unwrap();
        assert_eq!(t.source(), TemplateSource::Architecture("gemma"));
        let out = t
            .render(
                &[
                    msg(Role::System, "Be brief."),
                    msg(Role::User, "Hi"),
                    msg(Role::Assistant, "Hello!"),
                    msg(Role::User, "Bye"),
                ],
                None,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn unknown_architecture_without_template_uses_chatml() {
        let t = ChatTemplate::new(None, "mystery", String::new(), String::new()).unwrap();
        assert_eq!(t.source(), TemplateSource::DefaultChatml);
        let out = t.render(&[msg(Role::User, "Hi")], None, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_used_by_hub_templates_work() {
        let t = ChatTemplate::new(
            Some("{{ messages[0].content.strip().upper() }}{% if messages[0].content.startswith(' a') %}!{% endif %}".into()),
            "llama",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[msg(Role::User, " abc ")], None, false).unwrap(),
            "ABC!"
        );
    }

    #[test]
    fn raise_exception_in_a_template_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(
            Some("{{ raise_exception('roles must alternate') }}".into()),
            "llama",
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[msg(Role::User, "x")], None, true).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"));
    }

    #[test]
    fn a_template_that_knows_tools_renders_them() {
        let qwen_like = "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}";
        let t = ChatTemplate::new(
            Some(qwen_like.into()),
            "qwen2",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(t.handles_tools());
        let tool = serde_json::json!({"type": "function", "function": {"name": "add"}});
        let with = t
            .render(&[msg(Role::User, "Hi")], Some(&[tool]), true)
            .unwrap();
        assert!(
            with.contains(r#"<tools>{"function":{"name":"add"},"type":"function"}</tools>"#),
            "{with}"
        );
        let without = t.render(&[msg(Role::User, "Hi")], None, true).unwrap();
        assert!(!without.contains("<tools>"), "{without}");
        let plain = ChatTemplate::new(None, "llama", String::new(), String::new()).unwrap();
        assert!(!plain.handles_tools());
        let mentions =
            "{# no tools here #}{{ 'tools' }}{% for m in messages %}{{ m.content }}{% endfor %}";
        let mentions =
            ChatTemplate::new(Some(mentions.into()), "llama", String::new(), String::new())
                .unwrap();
        assert!(!mentions.handles_tools());
    }
}

//! The one pass every module goes through between validation and compilation: NaN checks where
//! a guest can observe a NaN's bits (module `nan`) and the fuel meter in the guest's own code
//! (module `meter`), in a single re-encoding of the module with wasm-encoder.
//!
//! What it adds to a module, all past the guest's own index spaces so no guest index moves:
//! five scratch locals per function; the meter memory, exported as [`meter::METER_EXPORT`];
//! and, for a module with a start function,
//! an empty function that becomes the start function while the real one is exported as
//! [`meter::START_EXPORT`], for the sandbox to call under the meter. A section the module lacks
//! is added where the binary format puts it. DWARF and code metadata are dropped: they locate
//! instructions by byte offset, which the pass moves.

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{
    CodeSection, ExportKind, ExportSection, Function, FunctionSection, Instruction, MemorySection,
    MemoryType, SectionId, TypeSection, ValType,
};
use wasmparser::{FunctionBody, Parser, Payload, TypeRef};

use super::meter::{self, BodyMeter};
use super::nan::{self, Scratch};

/// Locals (parameters included) a function may have: wasmparser's limit, which wasmtime
/// enforces.
const MAX_LOCALS: u32 = 50_000;
/// Scratch locals the rewrite adds to every function (f32, f64 and v128 for the NaN checks,
/// i64 and i32 for the meter). The server refuses modules with a function over
/// `MAX_LOCALS - SCRATCH_LOCALS` (server/src/module_check.rs), so no module it accepts fails
/// here.
pub const SCRATCH_LOCALS: u32 = 5;

/// What the pass does. The sandbox always uses [`Options::SANDBOX`]; tests switch parts off to
/// look at one at a time.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub nan: bool,
    pub meter: bool,
}

impl Options {
    pub const SANDBOX: Options = Options {
        nan: true,
        meter: true,
    };
}

/// Why a module could not be rewritten. Apart from reserved export names and too many locals,
/// only a module wasmtime would also refuse gets here, as the pass runs after validation.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare this module for the sandbox: {0}")]
pub struct RewriteError(String);

/// Rewrites a valid module.
pub fn rewrite(wasm: &[u8], options: Options) -> Result<Vec<u8>, RewriteError> {
    let mut rewriter = Rewriter::survey(wasm, options)?;
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| RewriteError(e.to_string()))?;
    Ok(module.finish())
}

/// Sections the pass may have to add, in binary order.
const ADDED: [SectionId; 5] = [
    SectionId::Type,
    SectionId::Function,
    SectionId::Memory,
    SectionId::Export,
    SectionId::Code,
];

/// A section's place in a module's binary layout.
fn rank(id: SectionId) -> u8 {
    match id {
        SectionId::Custom => 0,
        SectionId::Type => 1,
        SectionId::Import => 2,
        SectionId::Function => 3,
        SectionId::Table => 4,
        SectionId::Memory => 5,
        SectionId::Tag => 6,
        SectionId::Global => 7,
        SectionId::Export => 8,
        SectionId::Start => 9,
        SectionId::Element => 10,
        SectionId::DataCount => 11,
        SectionId::Code => 12,
        SectionId::Data => 13,
    }
}

/// What the function bodies and the added sections need to know about the whole module.
struct Rewriter {
    options: Options,
    /// Parameter count of each defined function, in code-section order.
    params: Vec<u32>,
    /// Index into `params` of the next body to rewrite.
    next_body: usize,
    types: u32,
    imported_functions: u32,
    functions: u32,
    memories: u32,
    /// The module's start function, which becomes an export.
    start: Option<u32>,
    /// Which of [`ADDED`] has been written, the module's own or the pass's.
    written: [bool; ADDED.len()],
}

impl Rewriter {
    fn survey(wasm: &[u8], options: Options) -> Result<Self, RewriteError> {
        let err = |e: wasmparser::BinaryReaderError| RewriteError(e.to_string());
        let mut type_params = Vec::new();
        let mut params = Vec::new();
        let (mut imported_functions, mut functions, mut memories) = (0, 0, 0);
        let mut start = None;
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(err)? {
                Payload::TypeSection(types) => {
                    for ty in types.into_iter_err_on_gc_types() {
                        type_params.push(ty.map_err(err)?.params().len() as u32);
                    }
                }
                Payload::ImportSection(imports) => {
                    for import in imports.into_imports() {
                        match import.map_err(err)?.ty {
                            TypeRef::Func(_) => {
                                imported_functions += 1;
                                functions += 1;
                            }
                            TypeRef::Memory(_) => memories += 1,
                            _ => {}
                        }
                    }
                }
                Payload::FunctionSection(section) => {
                    for ty in section {
                        let ty = ty.map_err(err)? as usize;
                        let count = type_params.get(ty).ok_or_else(|| {
                            RewriteError(format!("function type {ty} is missing"))
                        })?;
                        params.push(*count);
                        functions += 1;
                    }
                }
                Payload::MemorySection(section) => memories += section.count(),
                Payload::ExportSection(exports) => {
                    for export in exports {
                        let name = export.map_err(err)?.name;
                        if name.starts_with(meter::RESERVED_EXPORT_PREFIX) {
                            return Err(RewriteError(format!(
                                "it exports {name:?}, and names starting with {:?} are the \
                                 sandbox's",
                                meter::RESERVED_EXPORT_PREFIX
                            )));
                        }
                    }
                }
                Payload::StartSection { func, .. } => start = Some(func),
                _ => {}
            }
        }
        Ok(Self {
            options,
            params,
            next_body: 0,
            types: type_params.len() as u32,
            imported_functions,
            functions,
            memories,
            // The start function becomes an export only to run under the meter.
            start: start.filter(|_| options.meter),
            written: [false; ADDED.len()],
        })
    }

    /// The empty start function's index and type, when the module has a start function.
    fn trampoline(&self) -> Option<(u32, u32)> {
        self.start.map(|_| (self.functions, self.types))
    }

    fn meter_memory(&self) -> u32 {
        self.memories
    }

    fn mark(&mut self, id: SectionId) {
        if let Some(i) = ADDED.iter().position(|&a| a == id) {
            self.written[i] = true;
        }
    }

    // What the pass appends to each section, whether the module had it or not.

    fn add_types(&self, types: &mut TypeSection) {
        if self.trampoline().is_some() {
            types.ty().function([], []);
        }
    }

    fn add_functions(&self, functions: &mut FunctionSection) {
        if let Some((_, ty)) = self.trampoline() {
            functions.function(ty);
        }
    }

    fn add_memories(&self, memories: &mut MemorySection) {
        if self.options.meter {
            memories.memory(MemoryType {
                minimum: 1,
                maximum: Some(1),
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
        }
    }

    fn add_exports(&self, exports: &mut ExportSection) {
        if self.options.meter {
            exports.export(meter::METER_EXPORT, ExportKind::Memory, self.meter_memory());
        }
        if let Some(start) = self.start {
            exports.export(meter::START_EXPORT, ExportKind::Func, start);
        }
    }

    fn add_code(&self, code: &mut CodeSection) {
        if self.trampoline().is_some() {
            let mut empty = Function::new([]);
            empty.instruction(&Instruction::End);
            code.function(&empty);
        }
    }

    /// Writes `id` with only the pass's additions, for a module without that section.
    fn write_missing(&mut self, module: &mut wasm_encoder::Module, id: SectionId) {
        match id {
            SectionId::Type => {
                let mut s = TypeSection::new();
                self.add_types(&mut s);
                if !s.is_empty() {
                    module.section(&s);
                }
            }
            SectionId::Function => {
                let mut s = FunctionSection::new();
                self.add_functions(&mut s);
                if !s.is_empty() {
                    module.section(&s);
                }
            }
            SectionId::Memory => {
                let mut s = MemorySection::new();
                self.add_memories(&mut s);
                if !s.is_empty() {
                    module.section(&s);
                }
            }
            SectionId::Export => {
                let mut s = ExportSection::new();
                self.add_exports(&mut s);
                if !s.is_empty() {
                    module.section(&s);
                }
            }
            SectionId::Code => {
                let mut s = CodeSection::new();
                self.add_code(&mut s);
                if !s.is_empty() {
                    module.section(&s);
                }
            }
            _ => {}
        }
        self.mark(id);
    }
}

/// What the reencoder's hooks return.
type Reencoded<T> = Result<T, reencode::Error<RewriteError>>;

impl Reencode for Rewriter {
    type Error = RewriteError;

    fn intersperse_section_hook(
        &mut self,
        module: &mut wasm_encoder::Module,
        _after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> Reencoded<()> {
        let next = before.map_or(u8::MAX, rank);
        for (i, id) in ADDED.into_iter().enumerate() {
            // Sections are written in rank order, so every section ranked before the next one
            // that the module lacks goes here.
            if !self.written[i] && rank(id) < next {
                self.write_missing(module, id);
            }
        }
        if let Some(id) = before {
            // The module's own section comes next; `parse_*` below appends to it.
            self.mark(id);
        }
        Ok(())
    }

    fn parse_type_section(
        &mut self,
        types: &mut TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> Reencoded<()> {
        reencode::utils::parse_type_section(self, types, section)?;
        self.add_types(types);
        Ok(())
    }

    fn parse_function_section(
        &mut self,
        functions: &mut FunctionSection,
        section: wasmparser::FunctionSectionReader<'_>,
    ) -> Reencoded<()> {
        reencode::utils::parse_function_section(self, functions, section)?;
        self.add_functions(functions);
        Ok(())
    }

    fn parse_memory_section(
        &mut self,
        memories: &mut MemorySection,
        section: wasmparser::MemorySectionReader<'_>,
    ) -> Reencoded<()> {
        reencode::utils::parse_memory_section(self, memories, section)?;
        self.add_memories(memories);
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Reencoded<()> {
        reencode::utils::parse_export_section(self, exports, section)?;
        self.add_exports(exports);
        Ok(())
    }

    fn start_section(&mut self, start: u32) -> Reencoded<u32> {
        Ok(self.trampoline().map_or(start, |(index, _)| index))
    }

    fn parse_code_section(
        &mut self,
        code: &mut CodeSection,
        section: wasmparser::CodeSectionReader<'_>,
    ) -> Reencoded<()> {
        reencode::utils::parse_code_section(self, code, section)?;
        self.add_code(code);
        Ok(())
    }

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Reencoded<()> {
        // Code metadata (branch hints and the like) and DWARF locate instructions by byte
        // offset, which the rewrite moves; the module runs the same without them.
        if section.name().starts_with("metadata.code.") || section.name().starts_with(".debug_") {
            return Ok(());
        }
        reencode::utils::parse_custom_section(self, module, section)
    }

    fn parse_function_body(
        &mut self,
        code: &mut CodeSection,
        func: FunctionBody<'_>,
    ) -> Reencoded<()> {
        let params = *self.params.get(self.next_body).ok_or_else(|| {
            reencode::Error::UserError(RewriteError("more bodies than functions".into()))
        })?;
        self.next_body += 1;

        let mut locals = Vec::new();
        let mut next_local = params;
        for pair in func.get_locals_reader()? {
            let (count, ty) = pair?;
            next_local = next_local.checked_add(count).ok_or_else(|| {
                reencode::Error::UserError(RewriteError("too many locals".into()))
            })?;
            locals.push((count, self.val_type(ty)?));
        }
        if next_local > MAX_LOCALS - SCRATCH_LOCALS {
            return Err(reencode::Error::UserError(RewriteError(format!(
                "a function has {next_local} locals and parameters; the sandbox adds \
                 {SCRATCH_LOCALS} to each function and the limit is {MAX_LOCALS}"
            ))));
        }
        let scratch = Scratch {
            f32: next_local,
            f64: next_local + 1,
            v128: next_local + 2,
        };
        let slots = meter::Slots {
            memory: self.meter_memory(),
            spent: next_local + 3,
            length: next_local + 4,
            imported_functions: self.imported_functions,
        };
        locals.extend([
            (1, ValType::F32),
            (1, ValType::F64),
            (1, ValType::V128),
            (1, ValType::I64),
            (1, ValType::I32),
        ]);

        let Options { nan, meter } = self.options;
        let mut f = Function::new(locals);
        let mut body_meter = BodyMeter::new(slots);
        let vector_checks = if nan {
            nan::vector_checks(func.get_operators_reader()?)?
        } else {
            Vec::new()
        };
        let mut reader = func.get_operators_reader()?;
        let mut index = 0;
        while !reader.eof() {
            let op = reader.read()?;
            let vector_check = vector_checks.get(index) == Some(&true);
            if nan
                && let Some(kind) = nan::observes_top(&op)
                && (nan::enters_vector(&op).is_none() || vector_check)
            {
                nan::canonicalise(&mut f, kind, scratch);
            }
            let after = if meter {
                Some(body_meter.before(&mut f, &op)?)
            } else {
                None
            };
            let vector = if vector_check {
                nan::vector_arithmetic(&op)
            } else {
                None
            };
            index += 1;
            f.instruction(&self.instruction(op)?);
            if let Some(after) = after {
                body_meter.after(&mut f, after);
            }
            if let Some(kind) = vector {
                nan::canonicalise(&mut f, kind, scratch);
            }
        }
        code.function(&f);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
